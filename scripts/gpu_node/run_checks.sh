#!/usr/bin/env bash
# The GPU checks of issues 10 and 12, prepared to run on a lent GPU node (the device tool) in two
# calls of under 10 minutes each, within a session's 15 minutes of device time.
#
# Here, first (once): scripts/gpu_node/fetch_wheels.sh        # fills .whl/ (~46 MB, git-ignored)
# Then, with the device tool, back to back so the node stays warm (its kernel cache too):
#   run(command="bash scripts/gpu_node/run_checks.sh correctness", carry=[".whl"], timeout_s=360)
#   run(command="bash scripts/gpu_node/run_checks.sh speed", carry=[".whl"], timeout_s=590)
#
# Phases (`all` runs both, for a node with more time):
#   correctness  benchmarks/gpu_check.py (every scheme on an 8192x3072 weight, eager and compiled:
#                CUDA bytes = CPU bytes, and kernel throughput), then the GPU tests
#                (tests/quantizers/test_gpu.py, tests/workers/test_gpu_units.py: whole units on CUDA
#                give the CPU's shard bytes; search/hqq repeat exactly).
#   speed        a Llama-3-8B-shaped bf16 checkpoint (13.5 GiB, 4 shards) drawn on the GPU; the
#                node's `cat` read rate of it; benchmarks/convert.py --device cuda: W4A16, FP8 and
#                pass-through against model_free_ptq on cuda:0 with 1 and 4 workers and `cp`; then
#                W4A16 with search and hqq beside rtn (issue 12: at most 3x rtn's converting time).
# The node's python3 (3.12, CUDA torch, transformers) runs everything; .whl/ours (Ray, pydantic,
# compressed-tensors, ...) installs to /tmp/site, .whl/peer (llm-compressor and its pins) to
# /tmp/peer-site, which only the peer sees. quantfleet runs `convert --no-prefect` (no Prefect or
# boto3 on the node). Output goes to $OUT/<phase>.log, and docs/benchmarks.md (which the benchmarks
# update) is copied to $OUT after every step, so a call cut off at its limit still returns what
# was measured. Record the figures in docs/benchmarks.md here afterwards.
set -uo pipefail
cd "$(dirname "$0")/../.."
phase=${1:-all}
OUT=${OUT:-/tmp/qf-gpu-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/$phase.log") 2>&1
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1
PYTHON=${PYTHON:-python3}
WORK=${QF_GPU_WORK:-/tmp/qf-bench}

step() {  # step SECONDS NAME COMMAND...: run one check under a time limit, say how it ended
  local limit=$1 name=$2; shift 2
  local started=$SECONDS
  echo "=== $name (limit ${limit}s) $(date +%T)"
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - started)) s"
  cp docs/benchmarks.md "$OUT/benchmarks.md" 2>/dev/null
  return 0
}

install() {
  if [ -d .whl/ours ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/ours/*.whl || exit 1
  fi
  if [ -d .whl/peer ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/peer-site .whl/peer/*.whl || exit 1
  fi
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  echo "cores: $(nproc), memory: $(free -g | awk '/Mem:/ {print $2}') GiB, disk free: $(df -h /tmp | awk 'NR==2 {print $4}')"
  "$PYTHON" -c "import sys, torch, transformers, ray, pydantic, compressed_tensors; \
print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', \
transformers.__version__, 'ray', ray.__version__, 'cuda', torch.cuda.is_available())" || exit 1
  "$PYTHON" -m flows.cli compile-kernels --device cuda || echo "compile-kernels failed: eager kernels"
}

correctness() {
  step 150 "gpu_check (CUDA bytes vs CPU, kernel throughput)" "$PYTHON" benchmarks/gpu_check.py
  step 170 "GPU tests" "$PYTHON" -m pytest -q -p no:cacheprovider -o addopts="" \
    tests/quantizers/test_gpu.py tests/workers/test_gpu_units.py
}

speed() {
  local shape=(--workdir "$WORK" --layers 32 --mlp 14336 --shards 4 --shard-size 2GB --device cuda
               --no-prefect)
  step 60 "generate the 8B-shaped checkpoint on the GPU" "$PYTHON" -c "
import sys; from pathlib import Path; sys.path.insert(0, '.')
from benchmarks.convert import generate
print(generate(Path('$WORK/source'), 32, 14336, 4) / 2**30, 'GiB')"
  for run in 1 2; do
    step 60 "cat of the source, run $run" bash -c "TIMEFORMAT='cat: %R s'; time cat $WORK/source/*.safetensors > /dev/null"
  done
  step 330 "convert: W4A16, FP8, pass-through vs model_free_ptq and cp" "$PYTHON" benchmarks/convert.py \
    "${shape[@]}" --schemes W4A16,FP8,pass-through --peer-python "$PYTHON" --peer-path /tmp/peer-site
  step 200 "convert: W4A16 with rtn, search, hqq" "$PYTHON" benchmarks/convert.py "${shape[@]}" \
    --schemes W4A16 --methods rtn,search,hqq --skip-peer
}

install
case $phase in
  correctness) correctness ;;
  speed) speed ;;
  all) correctness; speed ;;
  *) echo "usage: $0 correctness|speed|all" >&2; exit 2 ;;
esac
echo "=== done: $phase, $SECONDS s"
