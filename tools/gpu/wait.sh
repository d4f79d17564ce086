#!/usr/bin/env bash
# Wait for a job started by tools/gpu/start.sh: poll LOG every 10 s for the job's last line
# ("== done in N s", tools/gpu/lib.sh) for at most SECONDS (default 540, inside one 10-minute
# device call), then print the log's tail. Exit 0 when the job is done, 1 when it is still
# running (call again).
#   bash tools/gpu/wait.sh LOG [SECONDS]
log=$1; limit=${2:-540}
for _ in $(seq $(( limit / 10 ))); do
  grep -q "^== done" "$log" 2>/dev/null && break
  sleep 10
done
tail -n 40 "$log"
grep -q "^== done" "$log"
