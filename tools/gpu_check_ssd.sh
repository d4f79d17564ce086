#!/usr/bin/env bash
# One device call (about 2 minutes): the Pallas SSD kernels on the GPU. Stages of
# tools/gpu_check_ssd.py, each under its own timeout so partial results come back:
# bf16 accuracy vs the float64 reference, fwd / fwd+bwd times (pallas vs xla at
# B=1, H=32, P=64, N=128, T = 8K and 16K), finiteness at T = 64K, then mamba_ssm and fla.
# Run from the repo root on the GPU machine; $OUT receives ssd_*.json, ssd_rows.md, ssd.log.
# The mamba_ssm Triton files come from .carry/mamba, fla-core 0.6.0 as a wheel in .whl/
# (neither committed); without them the baselines stage only says so.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
[ -d .carry/mamba ] && export PYTHONPATH=$PYTHONPATH:$PWD/.carry/mamba
LOG="$OUT/ssd.log"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$LOG"
S="python3 tools/gpu_check_ssd.py --out $OUT"
timeout ${CHECK_TIMEOUT:-30} $S check 2>&1 | tee -a "$LOG" | grep -v "^WARNING"
timeout ${BENCH_TIMEOUT:-40} $S bench --budget ${BENCH_BUDGET:-30} "$@" 2>&1 | tee -a "$LOG" | grep -v "^WARNING"
timeout ${NAN_TIMEOUT:-20} $S nan 2>&1 | tee -a "$LOG" | grep -v "^WARNING"
# torch and JAX share the GPU here: no JAX preallocation.
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout ${BASELINE_TIMEOUT:-20} $S baselines --budget ${BASELINE_BUDGET:-12} \
  2>&1 | tee -a "$LOG" | grep -v "^WARNING"
echo "rows:"; cat "$OUT/ssd_rows.md" 2>/dev/null
