#!/usr/bin/env bash
# The gated delta rule kernels on one GPU, as measured in BENCHMARKS.md ("Kernels: gated
# delta rule / Current numbers"): the GPU tests, then pallas vs xla vs fla's
# chunk_gated_delta_rule at H = 32, K = V = 64 (T = 16K, 8K), ours alone at 64K (with the
# NaN/Inf check), fla's reference shape H = 16, K = V = 128, B = 4 (T = 8K, 32K), and Nsight
# Compute counters of every kernel of one fwd+bwd call, ours and fla's. It took 1149 s on an
# H200 before the B = 4 step (limit 420 s) was added: longer than one 10-minute device call,
# so start it in the background and poll from later calls of the same lease:
#     OUT=/tmp/gdn setsid nohup bash tools/gpu_check_gdn.sh > /tmp/gdn.out 2>&1 < /dev/null &
#     for i in $(seq 57); do sleep 10; grep -q "^== done" /tmp/gdn.out && break; done; tail /tmp/gdn.out
# Each step has its own timeout and writes as it goes to $OUT: gdn_rows.md (markdown rows),
# gdn_*.json (rewritten after every row), *.log. fla-core 0.6.0 comes as a wheel in .whl/
# (never committed); without it the fla rows are skipped. At H = 32 `--tune prepare` first
# times the whole op with each gpu_prepare kernel at 2, 4 and 8 warps (a report; the rows keep
# the committed values). At H = 16, K = V = 128 `--tune recurrence` first sweeps the sequential kernels'
# V block and warps (at K = 128 the backward walk spills with 4 warps, not with 8;
# tools/triton_resources.py) and times the rest with the fastest.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false  # torch shares the GPU
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site
fi
step() {  # step SECONDS NAME CMD...: run CMD under a timeout, its output to $OUT/NAME.log
  local t=$1 name=$2; shift 2
  echo "== [${SECONDS}s] $name (timeout ${t}s): $*"
  timeout -k 5 "$t" "$@" > "$OUT/$name.log" 2>&1
  echo "== [${SECONDS}s] $name: rc $?"
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
B="python3 tools/bench_kernels.py --op gdn --markdown $OUT/gdn_rows.md"
T="python3 -m pytest tests/test_gated_delta_rule.py -m gpu -q -p no:cacheprovider"
step 240 gdn_pytest_prepare $T -k TestPreparePallasGPU
step 600 gdn_pytest_op $T -k TestPallasGPU
step 540 gdn_h32 $B --batch 1 --heads 32 --dk 64 --dv 64 --seqlen 16384 8192 --impls pallas xla --tune prepare \
  --json "$OUT/gdn_h32.json"
step 150 gdn_h32_64k $B --batch 1 --heads 32 --dk 64 --dv 64 --seqlen 65536 --no-fla --no-check --impls pallas xla \
  --json "$OUT/gdn_h32_64k.json"
step 480 gdn_h16 $B --batch 1 --heads 16 --dk 128 --dv 128 --seqlen 16384 --no-check --no-prepare --impls pallas xla \
  --tune recurrence --json "$OUT/gdn_h16.json"
step 420 gdn_b4 $B --batch 4 --heads 32 --dk 64 --dv 64 --seqlen 8192 32768 --no-check --no-prepare \
  --impls pallas xla --json "$OUT/gdn_b4.json"
step 180 gdn_ncu python3 tools/ncu_gdn.py
step 180 gdn_ncu_fla python3 tools/ncu_gdn.py --part fla
tail -n 2 "$OUT"/gdn_pytest_*.log; grep -h finite "$OUT"/gdn_h*.log; cat "$OUT"/gdn_ncu*.log; cat "$OUT/gdn_rows.md"
echo "== done in ${SECONDS}s"
