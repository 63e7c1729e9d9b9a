#!/usr/bin/env bash
# One call on a GPU machine with no internet (torch, triton, pytest-benchmark, matplotlib there):
# the kernel tests on CUDA, then the benchmark suite, logs and results into OUT_DIR (flat, 6 files).
#   bash bench/run_gpu.sh OUT_DIR
set -uo pipefail
out=${1:?usage: bash bench/run_gpu.sh OUT_DIR}
mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -m pytest tests -q -p no:cacheprovider --ignore-glob='tests/test_soda_*' 2>&1 | tee "$out/gpu-tests.log" | tail -3
python3 -m pytest bench -q -p no:cacheprovider --bench-out "$out" 2>&1 | tee "$out/bench.log" | grep -v "^ " | tail -25
cat "$out"/*.md 2>/dev/null
