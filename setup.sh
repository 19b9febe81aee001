#!/usr/bin/env bash
# Create .venv and install quantfleet with its test tools. Safe to re-run: it only installs what
# is missing. torch is installed first, pinned, so pip takes the CPU build from the machine's disk
# instead of downloading a multi-GB CUDA build (GPU machines: install the CUDA torch 2.13.0 first).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
fi
.venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -v -e "^WARNING: Location" -e "^ *$" -e "!!" -e "WheelFile" || true
.venv/bin/python -c "import quantizers, infra, workers, flows, ray, prefect" \
  || { echo "setup.sh: the install did not complete" >&2; exit 1; }
echo "setup.sh: ready (.venv/bin/quantfleet)"
