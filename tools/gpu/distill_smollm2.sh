#!/usr/bin/env bash
# The real distillation run (BENCHMARKS.md "Distillation") on one GPU:
# upcycle SmolLM2-135M-Instruct into the default MLA + GDN hybrid, then distill it with
# configs/distill_smollm2_gpu.py (stage 1, stage 2, long-context stage; evals before and after).
#   bash tools/gpu/distill_smollm2.sh TEACHER.gguf OUT_DIR [--config.x=y ...]
# Run it again on the same machine to go on: the student conversion is kept in
# /tmp/hylo_student, the run resumes from /tmp/hylo_distill/checkpoints, and compiled
# programs come from the persistent cache in /tmp/jax_cache. DISTILL_TIMEOUT (s) bounds
# the distillation of one call (SIGTERM writes a checkpoint first). Missing Python packages
# may be given as wheels (tools/gpu/lib.sh). Or, within one device lease, start it in the
# background so that it outlives the calls, and wait on it from the following calls:
#   DISTILL_TIMEOUT=3000 bash tools/gpu/start.sh /tmp/job.out tools/gpu/distill_smollm2.sh TEACHER.gguf OUT_DIR
#   bash tools/gpu/wait.sh /tmp/job.out
teacher=$1; OUT=$2; shift 2
source "$(dirname "$0")/lib.sh"
set -u
export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache
gpu_info
if [ ! -f /tmp/hylo_student/config.json ]; then
  # The 8 MLA layers that `mla_layers=auto` (the default) picked for SmolLM2 on CPU
  # (BENCHMARKS.md "Upcycling"), given explicitly to save the selection's device time;
  # the report's perplexities are in that section too.
  python3 -m hylo_jax.convert --config.source="$teacher" --config.output_dir=/tmp/hylo_student \
    --config.overwrite=true --config.student.mla_layers=0,1,2,8,11,16,20,24 --config.student.eval_windows=0 \
    2>&1 | grep --line-buffered -v "it/s\]\|tensor/s\]" > "$OUT/convert.log"
  echo "convert: ${SECONDS} s, rc ${PIPESTATUS[0]}"; tail -5 "$OUT/convert.log"
fi
# Bounded, so the logs and metrics below are copied out even if the run is cut short; no
# `step` here: the SIGTERM must leave the run time to write its checkpoint.
timeout "${DISTILL_TIMEOUT:-540}" python3 -m hylo_jax.distill --config=configs/distill_smollm2_gpu.py \
  --config.teacher="$teacher" --config.student=/tmp/hylo_student "$@" 2>&1 \
  | grep --line-buffered -v "it/s\]\|tensor/s\]\|composite_checkpoint_handler\|xla_bridge" | tee -a /tmp/hylo_distill.log
cp /tmp/hylo_distill.log "$OUT/distill_all.log"
cp /tmp/hylo_distill/metrics.jsonl /tmp/hylo_distill/summary.json /tmp/hylo_distill/loss_curves.png "$OUT/" 2>/dev/null
finish
