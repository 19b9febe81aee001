#!/usr/bin/env bash
# The GPU checks of issues 10 and 12, prepared to run on a lent GPU node (the device tool) in one
# call of under 10 minutes: a session has 15 minutes of device time, the node's start included.
#
# Here, first (once): scripts/gpu_node/fetch_wheels.sh        # fills .whl/ (~46 MB, git-ignored)
# Then, with the device tool (15 minutes of device time: a start of 1-2 minutes, then these):
#   run(command="bash scripts/gpu_node/run_checks.sh all", carry=[".whl"], timeout_s=600)
#   run(command="bash scripts/gpu_node/run_checks.sh extra", carry=[".whl"], timeout_s=170)
# The second only if the first left time (the node stays warm 30 s after a call, and keeps the
# checkpoint the first one drew).
#
# Steps, most important first, each under its own time limit so that one slow step cannot starve
# the rest (`all` is the first four, `extra` the last three; or name steps one by one):
#   gpu_check    benchmarks/gpu_check.py: every scheme on an 8192x3072 weight, eager and compiled,
#                CUDA bytes = CPU bytes, and kernel throughput
#   checkpoint   a Llama-3-8B-shaped bf16 checkpoint (13.5 GiB, 4 shards) drawn on the GPU, and the
#                node's `cat` read rate of it
#   convert      benchmarks/convert.py --device cuda: W4A16, pass-through (against `cp`) and FP8,
#                against model_free_ptq on cuda:0 with 1 and 4 workers (issue 10); should no quantfleet
#                row come out, benchmarks/profile_unit.py times one W4A16 unit on the GPU without Ray
#   methods      the same W4A16 conversion with search and hqq (issue 12: at most 3x rtn's
#                converting time, rtn's row being the convert step's)
#   units        W4A16 again with 500 MB output shards: 8 units sharing the GPU instead of 2
#   tests        the GPU tests: whole units on CUDA give the CPU's shard bytes, search/hqq repeat
#                exactly (tests/workers/test_gpu_units.py), then tests/quantizers/test_gpu.py
#   method_cost  benchmarks/method_cost.py --device cuda: search and hqq per tensor next to rtn, on
#                a routed expert's shape (1024x2048), every scheme (where issue 12's budget goes)
# The node's python3 (3.12, CUDA torch, transformers) runs everything; .whl/ours (Ray, pydantic,
# compressed-tensors, ...) installs to /tmp/site, .whl/peer (llm-compressor and its pins) to
# /tmp/peer-site, which only the peer sees. quantfleet runs `convert --no-prefect` (no Prefect or
# boto3 on the node). Output goes to $OUT/checks.log, and docs/benchmarks.md (which the benchmarks
# update) is copied to $OUT after every step, so a call cut off at its limit still returns what
# was measured (rows are printed as each run ends). Record the figures here afterwards.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/qf-gpu-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/checks.log") 2>&1
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1
PYTHON=${PYTHON:-python3}
WORK=${QF_GPU_WORK:-/tmp/qf-bench}

step() {  # step SECONDS NAME COMMAND...: run one check under a time limit, say how it ended
  local limit=$1 name=$2; shift 2
  local started=$SECONDS
  echo "=== $name (limit ${limit}s) $(date +%T)"
  timeout --kill-after=10 "$limit" "$@"
  LAST_RC=$?
  echo "=== $name: exit $LAST_RC after $((SECONDS - started)) s"
  if [ "$LAST_RC" -eq 124 ] || [ "$LAST_RC" -eq 137 ]; then
    # Cut off: whatever it started (Ray's processes, a conversion) must not run into the next step.
    pkill -9 -f 'raylet|gcs_server|ray::|flows.cli convert|model_free_ptq|dashboard/agent.py' 2>/dev/null
    sleep 1
  fi
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
}

LAST_RC=0
SHAPE=(--workdir "$WORK" --layers 32 --mlp 14336 --shards 4 --device cuda --no-prefect)

gpu_check() {
  step 90 "gpu_check (CUDA bytes vs CPU, kernel throughput)" "$PYTHON" benchmarks/gpu_check.py
}

checkpoint() {
  step 60 "generate the 8B-shaped checkpoint on the GPU" "$PYTHON" -c "
import sys; from pathlib import Path; sys.path.insert(0, '.')
from benchmarks.convert import generate
print(generate(Path('$WORK/source'), 32, 14336, 4) / 2**30, 'GiB')"
  for run in 1 2; do
    step 20 "cat of the source, run $run" bash -c "TIMEFORMAT='cat: %R s'; time cat $WORK/source/*.safetensors > /dev/null"
  done
}

rows() {  # quantfleet rows printed so far (0 before tee has made the log)
  local n; n=$(grep -c '^quantfleet ' "$OUT/checks.log" 2>/dev/null); echo "${n:-0}"
}

convert() {
  local before; before=$(rows)
  step 220 "convert: W4A16, pass-through, FP8 vs model_free_ptq and cp" "$PYTHON" benchmarks/convert.py \
    "${SHAPE[@]}" --shard-size 2GB --schemes W4A16,pass-through,FP8 --peer-python "$PYTHON" \
    --peer-path /tmp/peer-site
  sleep 1  # tee's copy of the last rows
  if [ "$(rows)" -eq "$before" ]; then  # not one quantfleet row: time one unit without Ray instead
    step 90 "fallback: one W4A16 unit on the GPU, in-process (no Ray)" "$PYTHON" benchmarks/profile_unit.py \
      "$WORK/source" --scheme W4A16 --shard-size 2GB --device cuda --runs 2 --top 15
  fi
}

methods() {
  step 110 "convert: W4A16 with search and hqq" "$PYTHON" benchmarks/convert.py "${SHAPE[@]}" \
    --shard-size 2GB --schemes W4A16 --methods search,hqq --skip-peer
}

units() {
  [ -f "$WORK/source/model.safetensors.index.json" ] || checkpoint
  step 70 "convert: W4A16 in 500 MB shards (8 units)" "$PYTHON" benchmarks/convert.py "${SHAPE[@]}" \
    --shard-size 500MB --schemes W4A16 --skip-peer --no-doc
}

tests() {
  step 50 "GPU tests" "$PYTHON" -m pytest -v -p no:cacheprovider -o addopts="" \
    tests/workers/test_gpu_units.py tests/quantizers/test_gpu.py
}

method_cost() {
  step 25 "per-tensor cost of search and hqq next to rtn" "$PYTHON" benchmarks/method_cost.py --device cuda
}

STEPS="gpu_check checkpoint convert methods units tests method_cost"
[ $# -gt 0 ] || { echo "usage: $0 all | extra | STEP... ($STEPS)" >&2; exit 2; }
[ "$1" = all ] && set -- gpu_check checkpoint convert methods
[ "$1" = extra ] && set -- units tests method_cost
for name in "$@"; do
  case " $STEPS " in
    *" $name "*) ;;
    *) echo "unknown step: $name ($STEPS)" >&2; exit 2 ;;
  esac
done
install
for name in "$@"; do "$name"; done
echo "=== done: $*, $SECONDS s"
