#!/usr/bin/env bash
# The real distillation run (BENCHMARKS.md "Distillation") on one GPU, in one go:
# upcycle SmolLM2-135M-Instruct into the default MLA + GDN hybrid, then distill it with
# configs/distill_smollm2_gpu.py (stage 1, stage 2, 16K stage; evals before and after).
#   bash tools/distill_smollm2_gpu.sh TEACHER.gguf OUT_DIR [--config.x=y ...]
# Missing Python packages may be given as wheels in $HYLO_WHEELS (installed to /tmp/site).
set -uo pipefail
teacher=$1; out=$2; shift 2
mkdir -p "$out"
if [ -n "${HYLO_WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$HYLO_WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" | tee -a "$out/gpu.txt"
t0=$(date +%s)
python3 -m hylo_jax.convert --config.source="$teacher" --config.output_dir=/tmp/hylo_student \
  --config.overwrite=true 2>&1 | grep -v "it/s\]\|tensor/s\]" > "$out/convert.log"
echo "convert: $(( $(date +%s) - t0 )) s, rc ${PIPESTATUS[0]}"; tail -25 "$out/convert.log"
# Bounded, so the logs and metrics below are copied out even if the run is cut short.
timeout "${DISTILL_TIMEOUT:-480}" python3 -m hylo_jax.distill --config=configs/distill_smollm2_gpu.py --config.teacher="$teacher" \
  --config.student=/tmp/hylo_student "$@" 2>&1 | grep -v "it/s\]\|tensor/s\]" | tee "$out/distill.log"
echo "total: $(( $(date +%s) - t0 )) s"
cp /tmp/hylo_distill/metrics.jsonl /tmp/hylo_distill/summary.json /tmp/hylo_distill/loss_curves.png "$out/" 2>/dev/null
