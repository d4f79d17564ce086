#!/usr/bin/env bash
# The gated delta rule kernels on one GPU, as reported in BENCHMARKS.md ("Kernels: gated
# delta rule"): the GPU tests, then pallas vs xla vs fla's chunk_gated_delta_rule at H = 32,
# K = V = 64 (T = 16K, 8K), ours alone at 64K (with the NaN/Inf check), fla's reference
# shape H = 16, K = V = 128, B = 4 (T = 8K, 32K), and Nsight Compute counters of every
# kernel of one fwd+bwd call, ours and fla's. It runs longer than one 10-minute device call:
# start it in the background and wait from later calls of the same lease (tools/README.md):
#     OUT=/tmp/gdn bash tools/gpu/start.sh /tmp/gdn.out tools/gpu/gdn.sh
#     bash tools/gpu/wait.sh /tmp/gdn.out        # again until it exits 0; then copy /tmp/gdn to $OUT
# Each step has its own timeout and writes as it goes to $OUT: gdn_rows.md (markdown rows),
# gdn_*.json (rewritten after every row), *.log. fla-core 0.6.0 comes as a wheel in .whl/
# (never committed); without it the fla rows are skipped. At H = 32 `--tune prepare` first
# times the whole op with each chunk-local kernel at 2, 4 and 8 warps (a report; the rows
# keep the committed BlockSizes). At H = 16, K = V = 128 `--tune recurrence` first sweeps the
# walks' V block and warps and times the rest with the fastest.
source "$(dirname "$0")/lib.sh"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # torch shares the GPU
gpu_info
B="python3 -m tools.bench kernels --op gdn --markdown $OUT/gdn_rows.md"
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
step 180 gdn_ncu python3 -m tools.bench ncu --json "$OUT/gdn_ncu.json"
step 180 gdn_ncu_fla python3 -m tools.bench ncu --part fla --json "$OUT/gdn_ncu_fla.json"
tail -n 2 "$OUT"/gdn_pytest_*.log; grep -h finite "$OUT"/gdn_h*.log; cat "$OUT"/gdn_ncu*.log; cat "$OUT/gdn_rows.md"
finish
