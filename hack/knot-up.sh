#!/usr/bin/env bash
# Starts Knot DNS as the tests' authoritative server: zone example.test on 127.0.0.1:PORT,
# dynamic updates (RFC 2136) allowed only when signed with the TSIG key `update-key`.
# usage: hack/knot-up.sh DIR [PORT]   prints knotd's PID once it answers; stop: kill PID
# env:   TSIG_SECRET (base64 hmac-sha256 secret; the tests' fixed one by default)
# needs: knotd, knotc, dig (hack/install-test-deps.sh installs them)
set -euo pipefail
DIR=${1:?usage: knot-up.sh DIR [PORT]}
PORT=${2:-5353}
SECRET=${TSIG_SECRET:-c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LTEyMzQ=}
mkdir -p "$DIR/run" "$DIR/zones"
DIR=$(cd "$DIR" && pwd)

cat > "$DIR/knot.conf" <<CONF
server:
    rundir: "$DIR/run"
    listen: 127.0.0.1@$PORT
log:
  - target: stderr
    any: info
database:
    storage: "$DIR/zones"
key:
  - id: update-key
    algorithm: hmac-sha256
    secret: $SECRET
acl:
  - id: signed-updates
    key: update-key
    action: update
template:
  - id: default
    storage: "$DIR/zones"
    file: "%s.zone"
    # Changes live in the journal only; the zone file stays as written here.
    zonefile-sync: -1
    journal-content: changes
zone:
  - domain: example.test
    acl: signed-updates
CONF

cat > "$DIR/zones/example.test.zone" <<'ZONE'
$ORIGIN example.test.
$TTL 60
@    SOA ns1 hostmaster 1 3600 600 86400 60
@    NS  ns1
ns1  A   127.0.0.1
ZONE

knotc -c "$DIR/knot.conf" conf-check >/dev/null
knotd -c "$DIR/knot.conf" >"$DIR/knotd.log" 2>&1 &
PID=$!
# Ready once it answers for the zone; a knotd that exits (port taken, bad config) says why.
for _ in $(seq 1 500); do
  if dig @127.0.0.1 -p "$PORT" +short +time=1 +tries=1 SOA example.test 2>/dev/null | grep -q '^ns1'; then
    echo "$PID"
    exit 0
  fi
  if ! kill -0 "$PID" 2>/dev/null; then
    echo "knot-up: knotd exited:" >&2
    cat "$DIR/knotd.log" >&2
    exit 1
  fi
  sleep 0.02
done
echo "knot-up: knotd did not answer on 127.0.0.1:$PORT within 10 s" >&2
cat "$DIR/knotd.log" >&2
kill "$PID" 2>/dev/null || true
exit 1
