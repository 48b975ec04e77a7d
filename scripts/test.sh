#!/usr/bin/env bash
# The test command: set up the venv with dev tools, lint, run the test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k metrics
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
venv=${PNEUMOSCOPE_VENV:-.venv}
# Tests never reach the internet: hub calls must fail fast, not retry for a minute.
export HF_HUB_OFFLINE=1
"$venv/bin/ruff" check src tests benchmarks
# The page's browser test drives Debian's Chromium (Playwright never downloads one); CI is root on Debian.
command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)
"$venv/bin/python" -m pytest -q "$@"
