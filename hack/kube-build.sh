#!/usr/bin/env bash
# Builds bin/kubecp, the real Kubernetes control plane the cluster tests run against:
# etcd, kube-apiserver, kube-controller-manager and kube-scheduler from the released modules
# pinned in hack/kube/go.mod (k8s.io/kubernetes v1.37.2, its staging modules at v0.37.2),
# plus the kstatus checker. Go's build cache makes a rebuild quick; an up-to-date binary is
# kept (its stamp is the hash of hack/kube's sources).
# usage: hack/kube-build.sh [OUT]      (default bin/kubecp)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-$ROOT/bin/kubecp}
SRC=$ROOT/hack/kube
VERSION=v1.37.2
stamp=$(cat "$SRC"/go.mod "$SRC"/go.sum "$SRC"/*.go | sha256sum | cut -c1-16)
if [ -x "$OUT" ] && [ "$(cat "$OUT.stamp" 2>/dev/null)" = "$stamp" ]; then
  exit 0
fi
command -v go >/dev/null || { echo "kube-build: needs Go (1.26 or newer) on PATH" >&2; exit 1; }
echo "building $OUT (Kubernetes $VERSION control plane; a cold build takes a while)"
start=$(date +%s)
mkdir -p "$(dirname "$OUT")"
cd "$SRC"
# As upstream builds its release binaries: static, no cgo, the version stamped in.
CGO_ENABLED=0 go build -mod=readonly -trimpath \
  -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=$VERSION \
    -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=37 \
    -X k8s.io/component-base/version.gitTreeState=clean" \
  -o "$OUT.tmp" .
mv "$OUT.tmp" "$OUT"
echo "$stamp" >"$OUT.stamp"
echo "built $OUT in $(( $(date +%s) - start )) s"
