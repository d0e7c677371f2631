#!/usr/bin/env bash
# Installs the real peers the relay's integration tests and hack/bench-relay use.
# usage: hack/relay-test-deps.sh      (as root; idempotent)
#   apt: postfix (smtp-sink, smtp-source, and the baseline relay of the benchmark), swaks
#        (+ libnet-ssleay-perl libio-socket-ssl-perl libauthen-sasl-perl for --tls/--auth),
#        knot (authoritative DNS serving MX records), bind9-dnsutils (nsupdate, dig), openssl, curl (bench)
#   pip (venv at .venv): aiosmtpd (scriptable sink), dkimpy + pynacl (independent DKIM verifier, Ed25519 too)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
if ! command -v swaks >/dev/null || ! perl -MNet::SSLeay -MAuthen::SASL -e1 2>/dev/null || ! command -v knotd >/dev/null || ! command -v nsupdate >/dev/null \
   || ! [ -x /usr/sbin/smtp-sink ]; then
  apt-get update -q
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    postfix swaks libnet-ssleay-perl libio-socket-ssl-perl libauthen-sasl-perl \
    knot bind9-dnsutils openssl curl python3-venv
fi
if ! [ -x "$ROOT/.venv/bin/python" ]; then
  python3 -m venv "$ROOT/.venv"
fi
"$ROOT/.venv/bin/pip" install -q aiosmtpd dkimpy pynacl
