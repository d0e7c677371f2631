#!/usr/bin/env bash
# Starts a private Postfix instance (not the system's mail service), the baseline relay of
# hack/bench-relay: it takes mail on 127.0.0.1:LPORT from 127.0.0.0/8 and relays all of it,
# queued on disk, to [127.0.0.1]:RPORT.
# usage: hack/postfix-relay-up.sh DIR [LPORT] [RPORT]   prints the master PID
#        stop: postfix -c DIR/conf stop
# needs: postfix (hack/relay-test-deps.sh), root (the queue belongs to the postfix user)
set -euo pipefail
DIR=${1:?usage: postfix-relay-up.sh DIR [LPORT] [RPORT]}
LPORT=${2:-10025}
RPORT=${3:-2525}
mkdir -p "$DIR/conf" "$DIR/queue" "$DIR/data" "$DIR/log"
DIR=$(cd "$DIR" && pwd)
# master.lock lives in data_directory, which must belong to the mail owner.
chown postfix:postfix "$DIR/data"

cat > "$DIR/conf/main.cf" <<CONF
compatibility_level = 3.6
queue_directory = $DIR/queue
data_directory = $DIR/data
# Postfix refuses (silently, rc 1) a maillog_file outside maillog_file_prefixes.
maillog_file = $DIR/log/maillog
maillog_file_prefixes = $DIR/log
myhostname = baseline.example.test
mydomain = example.test
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mydestination =
local_recipient_maps =
local_transport = error:no local delivery
alias_maps =
alias_database =
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
relayhost = [127.0.0.1]:$RPORT
smtp_dns_support_level = disabled
smtpd_peername_lookup = no
smtp_tls_security_level = none
smtpd_tls_security_level = none
biff = no
CONF

# Only the services a relaying instance uses; no chroot (column 5 = n).
{
  echo "127.0.0.1:$LPORT inet n - n - - smtpd"
  for svc in "pickup unix n - n 60 1 pickup" "cleanup unix n - n - 0 cleanup" \
    "qmgr unix n - n 300 1 qmgr" "tlsmgr unix - - n 1000? 1 tlsmgr" \
    "rewrite unix - - n - - trivial-rewrite" "bounce unix - - n - 0 bounce" \
    "defer unix - - n - 0 bounce" "trace unix - - n - 0 bounce" \
    "verify unix - - n - 1 verify" "flush unix n - n 1000? 0 flush" \
    "proxymap unix - - n - - proxymap" "proxywrite unix - - n - 1 proxymap" \
    "smtp unix - - n - - smtp" "relay unix - - n - - smtp" "showq unix n - n - - showq" \
    "error unix - - n - - error" "retry unix - - n - - error" \
    "discard unix - - n - - discard" "anvil unix - - n - 1 anvil" \
    "scache unix - - n - 1 scache" "postlog unix-dgram n - n - 1 postlogd"; do
    echo "$svc"
  done
} > "$DIR/conf/master.cf"

# `check` also creates the queue directories with their owners.
postfix -c "$DIR/conf" check
postfix -c "$DIR/conf" start
for _ in $(seq 1 500); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$LPORT") 2>/dev/null; then
    tr -d ' ' <"$DIR/queue/pid/master.pid"
    exit 0
  fi
  sleep 0.02
done
echo "postfix-relay-up: nothing listens on 127.0.0.1:$LPORT after 10 s" >&2
tail -n 20 "$DIR/log/maillog" >&2 || true
exit 1
