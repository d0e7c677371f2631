#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian machine with Rust and Python:
# Debian packages (real SMTP and DNS peers), helm and kubectl (into bin/), and Python tools
# (into .venv/). Idempotent: a second run only checks.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${MAILFLEET_SHARED:-$(cd "$ROOT/.." && pwd)/shared}
cd "$ROOT"

APT_PACKAGES=(knot knot-dnsutils bind9-dnsutils postfix swaks)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  # Postfix is only used as a program (smtp-sink, smtp-source, a private relay instance):
  # never configure or start the system's mail service.
  echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x bin/helm ] || [ ! -x bin/kubectl ]; then
  echo "installing helm and kubectl into bin/"
  # The script's last line pipes `kubectl version` into `head`, which can end in SIGPIPE
  # under pipefail; what matters is that both binaries arrived and run.
  bash "$SHARED/tools/get-helm.sh" v35 "$ROOT/bin" || true
  "$ROOT/bin/helm" version --short >/dev/null
  "$ROOT/bin/kubectl" version --client >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -r hack/requirements-test.txt

# Component-specific peers (each script installs what its tests need).
for extra in hack/*-test-deps.sh; do
  [ -e "$extra" ] || continue
  [ "$extra" = hack/install-test-deps.sh ] && continue
  bash "$extra"
done
