#!/usr/bin/env bash
# One baseline run: smtp-source submits N messages of SIZE bytes over SESSIONS parallel
# sessions to the Postfix of hack/postfix-relay-up.sh, which relays them to the sink; prints
# the acceptance rate and the end-to-end rate (until Postfix's queue is empty).
# usage: PF_DIR=DIR PF_PORT=LPORT hack/postfix-bench.sh [N] [SESSIONS] [SIZE]
set -euo pipefail
N=${1:-10000}
SESSIONS=${2:-20}
SIZE=${3:-1024}
DIR=${PF_DIR:?PF_DIR: the directory of hack/postfix-relay-up.sh}
PORT=${PF_PORT:-10025}
LOG=$DIR/log/maillog
queued() {
  find "$DIR/queue/incoming" "$DIR/queue/active" "$DIR/queue/deferred" "$DIR/queue/hold" \
    "$DIR/queue/maildrop" -type f 2>/dev/null | wc -l
}
[ "$(queued)" = 0 ] || { echo "postfix-bench: the queue is not empty" >&2; exit 1; }
before=$(grep -c 'status=sent' "$LOG" || true)
t0=$(date +%s.%N)
smtp-source -M localhost -f a@example.test -t b@example.test -s "$SESSIONS" -m "$N" -l "$SIZE" \
  "127.0.0.1:$PORT"
t1=$(date +%s.%N)
while [ "$(queued)" != 0 ]; do sleep 0.1; done
t2=$(date +%s.%N)
sleep 1.2 # postlogd writes the last lines a moment later
sent=$(( $(grep -c 'status=sent' "$LOG" || true) - before ))
awk -v n="$N" -v sent="$sent" -v t0="$t0" -v t1="$t1" -v t2="$t2" 'BEGIN {
  printf "accepted %d msgs in %.2f s = %.0f msg/s (smtp-source side)\n", n, t1 - t0, n / (t1 - t0)
  printf "delivered %d msgs end-to-end in %.2f s = %.0f msg/s (queue drained)\n", sent, t2 - t0, sent / (t2 - t0)
}'
