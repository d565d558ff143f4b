#!/usr/bin/env bash
# Everything a lent GPU is for, in one call: the GPU tests (bf16, real compilation, LaVIN-sized
# shapes) and the three benchmarks. Results land in $OUT (the device tool's folder; default
# benchmarks/results) as one archive plus the test log, to be unpacked into benchmarks/results/
# and committed with the device, date and commit each file already records.
#
#     bash benchmarks/run_gpu.sh            # from the repository root
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
work=$(mktemp -d)
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$work/device.txt"
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$work/device.txt"

# GPU tests first: a kernel that is wrong there is not worth timing.
timeout 240 python3 -m pytest -q -x tests/test_mm_adapter.py tests/test_visual_neck.py tests/test_vit.py \
    tests/test_llama.py tests/test_lavin.py tests/test_generation.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -5

(cd benchmarks && timeout 150 python3 bench_mm_adapter.py --out "$work") 2>&1 | tail -3
(cd benchmarks && timeout 90 python3 bench_neck.py --out "$work") 2>&1 | tail -3
(cd benchmarks && timeout 150 python3 bench_train_step.py --out "$work") 2>&1 | tail -3
tar -czf "$OUT/gpu_results.tar.gz" -C "$work" .
ls -l "$work"
