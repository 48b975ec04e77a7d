#!/usr/bin/env bash
# The main job: set up, get the data (downloaded when no --data is given), then a quick
# comparison of a pretrained EfficientNet-Lite0 with a ResNet-18 baseline (configs/quick.yaml).
#   scripts/quickstart.sh --data ../shared/data/chest_xray
# Extra arguments go to `pneumoscope compare` (e.g. --out DIR, --epochs N).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh all
venv=${PNEUMOSCOPE_VENV:-.venv}
exec "$venv/bin/pneumoscope" compare --config configs/quick.yaml "$@"
