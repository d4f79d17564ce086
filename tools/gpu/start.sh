#!/usr/bin/env bash
# Start a GPU job in the background so that it outlives the device call that starts it:
#   bash tools/gpu/start.sh LOG JOB.sh [ARGS...]
# (from the repo root; OUT and the job's own variables pass through). Later calls of the
# same lease wait on it with tools/gpu/wait.sh LOG.
set -euo pipefail
log=$1; shift
setsid nohup bash "$@" > "$log" 2>&1 < /dev/null &
echo "started $* (pid $!), log $log"
