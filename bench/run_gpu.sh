#!/usr/bin/env bash
# The GPU test suite and benchmark in one device call, from a plain checkout: no install
# (PYTHONPATH=.), no internet. The kernel tests run first on CUDA (gpu-tests.log; the model
# package's tests need the datasets installed and stay on the CPU machines); SODA_GPU_TESTS=0 skips them.
#   bash bench/run_gpu.sh OUT_DIR                      # the default grid, about 6 minutes in all
#   SODA_BENCH_GRID=full SODA_BENCH_BUDGET_S=480 bash bench/run_gpu.sh OUT_DIR -k "B=16384"   # a slice
# Extra arguments go to pytest. Writes 5 files into OUT_DIR (flat): <date>-<device>.json and .md
# (rewritten after every test, so a run cut short keeps what it measured), .png, bench.log and gpu-tests.log.
# Past the budget (SODA_BENCH_BUDGET_S, default 300 s, from the first test) tests are skipped; pytest is
# stopped at budget + 60 s.
set -uo pipefail
out=${1:?usage: bash bench/run_gpu.sh OUT_DIR [pytest arguments]}
shift
mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1 SODA_BENCH_BUDGET_S=${SODA_BENCH_BUDGET_S:-300}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,memory.used --format=csv
if [ "${SODA_GPU_TESTS:-1}" = 1 ]; then
  timeout --signal=INT --kill-after=15 200 python3 -m pytest tests -q -p no:cacheprovider \
    --ignore-glob='tests/test_soda_*' 2>&1 | tee "$out/gpu-tests.log" | tail -4
fi
timeout --signal=INT --kill-after=15 $((${SODA_BENCH_BUDGET_S%.*} + 60)) \
  python3 -m pytest bench -q -p no:cacheprovider --bench-out "$out" "$@" 2>&1 \
  | tee "$out/bench.log" | grep -E "^(bench:|FAILED|ERROR|SKIPPED|=* ?[0-9]+ (passed|failed|skipped|error))"
python3 -m bench.plot "$out"/*.json
cat "$out"/*.md
