#!/usr/bin/env bash
# Wheels a lent GPU node needs (Python 3.12, no network there), into .whl/ (git-ignored; the
# device tool's `carry`): .whl/ours for quantfleet's `convert --no-prefect` on local paths, and
# .whl/peer for llm-compressor's model_free_ptq, the side-by-side peer of benchmarks/convert.py.
# The node's image already has torch (CUDA), transformers, safetensors, numpy, psutil, pyarrow,
# tqdm, pyyaml, requests, msgpack, protobuf and aiohttp's parts; Prefect and boto3 are not needed
# (imported lazily). Ray is slimmed to fit the 64 MiB carry limit (slim_wheel.py says what goes).
# Run here, on the development machine: scripts/gpu_node/fetch_wheels.sh; then see run_checks.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
download() {  # download DEST SPEC...: cp312 manylinux wheels, no dependencies (each is named)
  local dest=$1; shift
  mkdir -p "$dest"
  "$PYTHON" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d "$dest" "$@" 2>&1 | grep -v "^WARNING: Location" || true
}
rm -rf .whl
# typing-extensions too, though the node has one: pydantic(-core) 2.14 want >= 4.16 and fail to
# import under < 4.14 (no typing_extensions.Sentinel); ours, ahead on PYTHONPATH, is newer than
# whatever the image pinned, and typing-extensions only ever adds names.
download .whl/ours ray==2.60.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
  typing-inspection==0.4.5 typing-extensions==4.16.0 compressed-tensors==0.20.0 gguf==0.19.0 \
  loguru==0.7.3 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 \
  rpds-py==2026.9.1
"$PYTHON" scripts/gpu_node/slim_wheel.py .whl/ours/ray-*.whl ray/jars/ ray/dashboard/client/ ray/rllib/
# llmcompressor 0.14.0.1 wants compressed-tensors 0.19.0 and transformers <= 5.17 (the node has
# 5.17): it gets a site of its own, ahead of ours on its PYTHONPATH.
download .whl/peer llmcompressor==0.14.0.1 compressed-tensors==0.19.0 datasets==4.8.4 dill==0.4.0 \
  multiprocess==0.70.18
for wheel in .whl/ours/*.whl .whl/peer/*.whl; do [ -s "$wheel" ] || { echo "missing: $wheel" >&2; exit 1; }; done
ls .whl/ours .whl/peer
du -sh .whl
