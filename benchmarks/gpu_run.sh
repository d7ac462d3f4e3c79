#!/usr/bin/env bash
# One call on the GPU machine: install, GPU tests, benchmarks; logs under $OUT.
# env: GPU_TESTS (test paths), PYTEST_ARGS, TEST_TIMEOUT, BENCH_SCRIPTS, BENCH_ARGS, BENCH_TIMEOUT
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if ! python3 -c "import pytest" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" | tee -a "$OUT/gpu.txt"
timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q --maxfail=15 -m gpu ${GPU_TESTS:-tests/gpu} ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
for script in ${BENCH_SCRIPTS:-bench_forward}; do
  timeout ${BENCH_TIMEOUT:-300} python3 benchmarks/$script.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/$script.log" | tail -70
done
