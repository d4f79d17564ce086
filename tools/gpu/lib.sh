# Sourced by the GPU jobs in tools/gpu/ (from the repo root): the job mechanics in one place.
#   OUT        results folder (default /tmp/out), created here
#   wheels     Python packages the device lacks, as wheels (never committed): every .whl in
#              $HYLO_WHEELS (default .whl/) installed to /tmp/site, which goes on PYTHONPATH
#   step SECONDS NAME CMD...   run CMD under a timeout, its output to $OUT/NAME.log, and print
#              "== [time] NAME: rc N", so one step cut short leaves the others' results
#   gpu_info   the GPU, driver and jax version, to $OUT/gpu.txt
#   finish     the last line of every job, "== done in N s", which tools/gpu/wait.sh looks for
set -o pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

wheels=${HYLO_WHEELS:-.whl}
if ls "$wheels"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$wheels"/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi

step() {
  local t=$1 name=$2; shift 2
  echo "== [${SECONDS}s] $name (timeout ${t}s): $*"
  timeout -k 5 "$t" "$@" > "$OUT/$name.log" 2>&1
  echo "== [${SECONDS}s] $name: rc $?"
}

gpu_info() {
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
  python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" \
    | tee -a "$OUT/gpu.txt"
}

finish() {
  echo "== done in ${SECONDS}s"
}
