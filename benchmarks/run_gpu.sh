#!/usr/bin/env bash
# Everything a lent GPU is for, in one call that ends within 8 minutes (BUDGET_S, default 465 s)
# on a bare machine (torch and triton installed, no flash-attn, no internet; nothing is installed:
# the checkout goes on PYTHONPATH): the GPU tests with the small hypothesis profile, then the
# benchmarks and the MM-Adapter block-size sweep. Everything lands in $OUT (default
# benchmarks/results) the moment it exists: each step's log line by line, each benchmark row
# appended to its CSV, the sweep's best table rewritten after every trial. A kill at any moment
# keeps what was measured.
#
# Time budget per step, in seconds, each cut to what is left of BUDGET_S (a step with under 10 s
# left is skipped, and says so in run_gpu.log):
#   device info ~5 | GPU tests 120 | bench_mm_adapter 130 | sweep 75 | bench_train_step 75 |
#   bench_neck 55 | total 460
#
#     OUT=/some/folder bash benchmarks/run_gpu.sh      # from any folder
#     LAVIN_FAST_COMMIT=$(git rev-parse --short HEAD)  # names the commit where the copy has no .git
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
OUT=${OUT:-$root/benchmarks/results}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
BUDGET_S=${BUDGET_S:-465}
started=$SECONDS
export PYTHONUNBUFFERED=1 LAVIN_FAST_HYPOTHESIS=ci PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
# setup.py installs kernels/ as lavin_fast.kernels; without an install a link does the same.
[ -e lavin_fast/kernels ] || ln -s ../kernels lavin_fast/kernels

say() { echo "[run_gpu $((SECONDS - started))s] $*" | tee -a "$OUT/run_gpu.log"; }

# step NAME BUDGET COMMAND...: run COMMAND for at most BUDGET seconds (less if the whole budget is
# running out), its output going straight to $OUT/NAME.log; the last lines are echoed here.
step() {
    local name=$1 budget=$2
    shift 2
    local left=$((BUDGET_S - (SECONDS - started)))
    ((budget > left)) && budget=$left
    if ((budget < 10)); then
        say "$name skipped: ${left}s of the budget left"
        return
    fi
    say "$name: up to ${budget}s"
    local t0=$SECONDS
    STEP_BUDGET_S=$budget timeout --kill-after=5 "$budget" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 4 "$OUT/$name.log"
    say "$name: exit $rc after $((SECONDS - t0))s$( ((rc == 124 || rc == 137)) && echo ' (cut by its budget)')"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$OUT/device.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
    >>"$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

# GPU tests first (a kernel that is wrong there is not worth timing), kernels' own tests first.
step gpu_tests 120 python3 -m pytest -v -p no:cacheprovider --maxfail=20 tests/test_mm_adapter.py \
    tests/test_visual_neck.py tests/test_vit.py tests/test_llama.py tests/test_lavin.py tests/test_generation.py
step bench_mm_adapter 130 python3 benchmarks/bench_mm_adapter.py --out "$OUT" --dtypes bf16
# The sweep stops itself 15 s before its timeout, so it ends with its table written.
step sweep_mm_adapter 75 bash -c 'python3 benchmarks/sweep_mm_adapter.py --out "$0" --dtypes bf16 --budget-s $((STEP_BUDGET_S - 15))' "$OUT"
step bench_train_step 75 python3 benchmarks/bench_train_step.py --out "$OUT"
step bench_neck 55 python3 benchmarks/bench_neck.py --out "$OUT" --dtypes bf16
say "done; results in $OUT"
ls -l "$OUT"
