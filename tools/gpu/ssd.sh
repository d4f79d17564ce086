#!/usr/bin/env bash
# One device call (about 2 minutes): the Pallas SSD kernels on the GPU, in the stages of
# `python -m tools.bench kernels --op ssd` (tools/bench/ssd.py), each under its own timeout
# so partial results come back: bf16 accuracy vs the float64 reference, fwd / fwd+bwd times
# (pallas vs xla at B = 1, H = 32, P = 64, N = 128, T = 8K and 16K), finiteness at T = 64K,
# then mamba_ssm and fla. Arguments go to the bench stage (e.g. --seqlen 16384). $OUT gets
# ssd_<stage>.json, ssd_rows.md and ssd_<stage>.log. The mamba_ssm Triton files come from
# .carry/mamba, fla-core 0.6.0 as a wheel in .whl/ (neither committed); without them the
# baselines stage only says so.
source "$(dirname "$0")/lib.sh"
[ -d .carry/mamba ] && export PYTHONPATH=$PYTHONPATH:$PWD/.carry/mamba
gpu_info
S="python3 -m tools.bench kernels --op ssd --markdown $OUT/ssd_rows.md"
step "${CHECK_TIMEOUT:-30}" ssd_check $S --stage check --json "$OUT/ssd_check.json"
step "${BENCH_TIMEOUT:-40}" ssd_bench $S --stage bench --json "$OUT/ssd_bench.json" --time-budget "${BENCH_BUDGET:-30}" "$@"
step "${NAN_TIMEOUT:-20}" ssd_nan $S --stage nan --json "$OUT/ssd_nan.json"
# torch and JAX share the GPU here: no JAX preallocation.
step "${BASELINE_TIMEOUT:-20}" ssd_baselines env XLA_PYTHON_CLIENT_PREALLOCATE=false $S --stage baselines \
  --json "$OUT/ssd_baselines.json" --time-budget "${BASELINE_BUDGET:-12}"
grep -h "failed\|pallas_chunk\|finite_T\|^check" "$OUT"/ssd_*.log
echo "rows:"; cat "$OUT/ssd_rows.md" 2>/dev/null
finish
