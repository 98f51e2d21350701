#!/usr/bin/env bash
# The GPU figures on a lent GPU machine, in one call (BENCHMARKS.md, "GPU figures on a lent machine"):
#   make gpu-kit                      # here, once: .whl/ with DeepSpeed and faiss-cpu
#   run(command="bash bench/gpu_device.sh", carry=[".whl"], timeout_s=560)      # the device tool
# then copy the returned BENCHMARKS.md over this one (only gpu/* rows change) and commit.
# SMOKE=1 runs only the tiny sizes (a dry run of the whole path, not timed here) and writes no rows.
# The machine has PyTorch but no Ray: `attrlab bench gpu` runs the in-process loop (`--local`).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/attrlab-gpu-out}
mkdir -p "$OUT"
ls .whl/*.whl >/dev/null 2>&1 || { echo "gpu_device: no .whl/: run 'make gpu-kit' here and carry .whl" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 2
export PYTHONPATH="/tmp/site:$PWD" ATTRLAB_TRACKING=0 PYTHONUNBUFFERED=1
# work that would start after this many seconds is skipped (the goal rows run first), so the call
# returns its rows inside the device tool's 600 s per command
export ATTRLAB_GPU_BUDGET_S=${ATTRLAB_GPU_BUDGET_S:-400}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import sys, torch, deepspeed; print(sys.version.split()[0], torch.__version__, deepspeed.__version__)'
} 2>&1 | tee "$OUT/device.txt"
bench() { python3 -m jobs.cli bench gpu --work /tmp/attrlab-bench "$@"; }
if [ "${SMOKE:-0}" = 1 ]; then
  bench --smoke 2>&1 | tee "$OUT/gpu_smoke.log"
  exit "${PIPESTATUS[0]}"
fi
cp BENCHMARKS.md "$OUT/BENCHMARKS.md"
bench --md "$OUT/BENCHMARKS.md" 2>&1 | tee "$OUT/gpu_bench.log"
exit "${PIPESTATUS[0]}"
