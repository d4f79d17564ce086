#!/usr/bin/env bash
# The real distillation run (BENCHMARKS.md "Distillation") on one GPU:
# upcycle SmolLM2-135M-Instruct into the default MLA + GDN hybrid, then distill it with
# configs/distill_smollm2_gpu.py (stage 1, stage 2, long-context stage; evals before and after).
#   bash tools/distill_smollm2_gpu.sh TEACHER.gguf OUT_DIR [--config.x=y ...]
# Run it again on the same machine to go on: the student conversion is kept in
# /tmp/hylo_student, the run resumes from /tmp/hylo_distill/checkpoints, and compiled
# programs come from the persistent cache in /tmp/jax_cache. DISTILL_TIMEOUT (s) bounds
# one call (SIGTERM writes a checkpoint first). Missing Python packages may be given as
# wheels in $HYLO_WHEELS (installed to /tmp/site, which later calls find again).
# Or, within one device lease, start it in the background so that it outlives the calls:
#   DISTILL_TIMEOUT=3000 setsid nohup bash tools/distill_smollm2_gpu.sh ... > /tmp/job.out 2>&1 < /dev/null &
# and let the following calls wait on /tmp/job.out (its last line is "total: N s").
set -uo pipefail
teacher=$1; out=$2; shift 2
mkdir -p "$out"
if [ -n "${HYLO_WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$HYLO_WHEELS"/*.whl || exit 1
fi
export PYTHONPATH=$PWD:/tmp/site:${PYTHONPATH:-} PYTHONUNBUFFERED=1
export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" | tee -a "$out/gpu.txt"
t0=$(date +%s)
if [ ! -f /tmp/hylo_student/config.json ]; then
  # The 8 MLA layers that `mla_layers=auto` (the default) picked for SmolLM2 on CPU
  # (BENCHMARKS.md "Upcycling"), given explicitly to save the selection's device time;
  # the report's perplexities are in that section too.
  python3 -m hylo_jax.convert --config.source="$teacher" --config.output_dir=/tmp/hylo_student \
    --config.overwrite=true --config.student.mla_layers=0,1,2,8,11,16,20,24 --config.student.eval_windows=0 \
    2>&1 | grep --line-buffered -v "it/s\]\|tensor/s\]" > "$out/convert.log"
  echo "convert: $(( $(date +%s) - t0 )) s, rc ${PIPESTATUS[0]}"; tail -5 "$out/convert.log"
fi
# Bounded, so the logs and metrics below are copied out even if the run is cut short.
timeout "${DISTILL_TIMEOUT:-540}" python3 -m hylo_jax.distill --config=configs/distill_smollm2_gpu.py \
  --config.teacher="$teacher" --config.student=/tmp/hylo_student "$@" 2>&1 \
  | grep --line-buffered -v "it/s\]\|tensor/s\]\|composite_checkpoint_handler\|xla_bridge" | tee -a /tmp/hylo_distill.log
echo "total: $(( $(date +%s) - t0 )) s"
cp /tmp/hylo_distill.log "$out/distill_all.log"
cp /tmp/hylo_distill/metrics.jsonl /tmp/hylo_distill/summary.json /tmp/hylo_distill/loss_curves.png "$out/" 2>/dev/null
true
