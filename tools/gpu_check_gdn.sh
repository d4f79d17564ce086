#!/usr/bin/env bash
# One device call of at most ~235 s (give the run timeout_s=240): quick GPU tests of the
# gated delta rule kernels, then fwd and fwd+bwd timings of pallas vs xla vs fla at fla's
# layout (B, T, H, D) = (1, 8192 | 16384, 16, 128), and of ours alone at (1, 65536, 32, 64)
# with a NaN/Inf check there (bf16). Run from the repo root on the GPU machine:
#     bash tools/gpu_check_gdn.sh
# Each step has its own `timeout` inside the overall budget and writes as it goes to $OUT:
# gdn_rows.md (markdown table rows), gdn_bench_*.json (rewritten after every row), *.log.
# flash-linear-attention (fla-core 0.6.0) comes as a wheel in .whl/ (never committed).
set -o pipefail
BUDGET=${BUDGET:-230}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
# step CAP CMD...: run CMD under timeout min(CAP, what is left of BUDGET), or skip it.
step() {
  local cap=$1; shift
  local left=$((BUDGET - SECONDS)); local t=$((cap < left ? cap : left))
  if ((t < 15)); then echo "skipped, budget spent: $*"; return 0; fi
  echo "== [${SECONDS}s] (timeout ${t}s) $*"
  timeout -k 3 "$t" "$@"; local rc=$?
  ((rc == 124)) && echo "== timed out after ${t}s: $*"
  return 0
}
if ls .whl/*.whl >/dev/null 2>&1; then
  step 40 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import jax, triton, torch; print('jax', jax.__version__, jax.devices(), 'triton', triton.__version__, 'torch', torch.__version__)"
# Quick GPU tests: the chunk-local kernels vs xla.prepare (values and VJP, 11 shapes; also
# with TF32x3 float32 dots) and the whole Pallas form vs the float64 reference.
# bench_kernels checks o and all five gradients at T = 1000 in bf16 below as well.
step 70 python3 -m pytest tests/test_gated_delta_rule.py -m gpu -q -p no:cacheprovider \
  -k "TestPreparePallasGPU or (TestPallasGPU and test_matches_reference)" 2>&1 | tee "$OUT/gdn_pytest.log" | tail -15
echo "| impl | pass | B | T | H | K | V | time | TFLOP/s | roofline |" > "$OUT/gdn_rows.md"
echo "|---|---|---|---|---|---|---|---|---|---|" >> "$OUT/gdn_rows.md"
# The reference shape (T = 16384) first, in case the budget runs out.
step 95 python3 tools/bench_kernels.py --op gdn --batch 1 --seqlen 16384 8192 --heads 16 --dk 128 --dv 128 \
  --time-budget 45 --markdown "$OUT/gdn_rows.md" --json "$OUT/gdn_bench_h16_k128.json" 2>&1 | tee "$OUT/gdn_bench_h16_k128.log"
step 50 python3 tools/bench_kernels.py --op gdn --batch 1 --seqlen 65536 --heads 32 --dk 64 --dv 64 --no-fla --no-check \
  --time-budget 20 --markdown "$OUT/gdn_rows.md" --json "$OUT/gdn_bench_h32_k64.json" 2>&1 | tee "$OUT/gdn_bench_h32_k64.log"
echo "== done in ${SECONDS}s"; cat "$OUT/gdn_rows.md"
