#!/usr/bin/env bash
# One device call: GPU tests of the gated delta rule kernels, then the GDN benchmark.
# Run from the repo root on the GPU machine; $OUT (if set) receives the logs and JSON.
# flash-linear-attention (fla-core 0.6.0) comes as a wheel in .whl/ (never committed).
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PWD:/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import jax, triton, torch; print('jax', jax.__version__, jax.devices(), 'triton', triton.__version__, 'torch', torch.__version__)"
timeout ${TEST_TIMEOUT:-200} python3 -m pytest tests/test_gated_delta_rule.py -m gpu -q -p no:cacheprovider 2>&1 | tee "$OUT/gdn_pytest.log" | tail -25
timeout ${BENCH_TIMEOUT:-330} python3 tools/bench_kernels.py --op gdn --json "$OUT/gdn_bench.json" \
  --time-budget ${BENCH_BUDGET:-200} --tune "$@" 2>&1 | tee "$OUT/gdn_bench.log"
