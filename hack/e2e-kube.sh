#!/usr/bin/env bash
# The cluster suite on a real Kubernetes control plane: hack/kube-up starts kube-apiserver,
# etcd, kube-controller-manager and kube-scheduler (bin/kubecp) with RBAC on, and the node
# agent that runs pods as processes of target/debug/mailfleet; helm installs charts/mailfleet
# (CRDs from the chart, one operator replica, which authenticates with the chart's
# ServiceAccount token); then the tests that take a kubeconfig run against it, sharing it.
# usage: hack/e2e-kube.sh [cargo test args...]      (needs bin/helm, bin/kubectl, Go)
# env:   MAILFLEET_KUBE_DIR (default target/kube-e2e): the control plane's state and logs,
#        kept after the run for reading (node agent pods' output in DIR/node/pods/);
#        MAILFLEET_KUBE_KEEP=1 keeps the control plane running after the run;
#        MAILFLEET_POD_CIDR (default 127.77.0.0/16): the pods' loopback addresses (two runs
#        at once on one machine need two ranges).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
DIR=${MAILFLEET_KUBE_DIR:-$ROOT/target/kube-e2e}
export PATH="$ROOT/bin:$PATH"
cargo build --locked -q -p mailfleet
BIN=$ROOT/target/debug/mailfleet
IMAGE=ghcr.io/mailfleet/mailfleet

[ ! -d "$DIR" ] || bash hack/kube-down --purge "$DIR"
bash hack/kube-up --dir "$DIR" --node-agent "$BIN" --image "$IMAGE=$BIN" \
  --pod-cidr "${MAILFLEET_POD_CIDR:-127.77.0.0/16}" >/dev/null
# MAILFLEET_KUBE_KEEP=1 leaves the control plane running afterwards, to look into.
[ "${MAILFLEET_KUBE_KEEP:-0}" = 1 ] || trap 'bash hack/kube-down "$DIR"' EXIT
export KUBECONFIG=$DIR/kubeconfig

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
COORDINATOR=$(free_port) METRICS=$(free_port) HEALTH=$(free_port)
# The node agent's pods share this machine's network: the relays dial the operator's
# coordinator on loopback (Services do not route to loopback pod IPs).
echo "== helm install charts/mailfleet on the real control plane"
helm install mailfleet charts/mailfleet -n mailfleet-system --create-namespace \
  --set replicaCount=1 --set image.repository="$IMAGE" \
  --set coordinator.port="$COORDINATOR" --set coordinator.url="https://127.0.0.1:$COORDINATOR" \
  --set metrics.port="$METRICS" --set health.port="$HEALTH" \
  --wait --timeout 5m
kubectl -n mailfleet-system get deploy,pods -o wide

echo "== cluster suite on the real control plane"
MAILFLEET_E2E_KUBECONFIG=$KUBECONFIG MAILFLEET_E2E_REACH=pod-ip MAILFLEET_KUBE_DIR=$DIR \
  MAILFLEET_E2E_RELEASE=mailfleet MAILFLEET_E2E_RELEASE_NAMESPACE=mailfleet-system \
  cargo test --locked -p mailfleet --test cluster_e2e --test fleet_e2e --test dnsauth_e2e --test warmup_e2e "$@"

echo "== what only a real control plane shows: kstatus health, RBAC least privilege (audit log)"
MAILFLEET_E2E_KUBECONFIG=$KUBECONFIG MAILFLEET_KUBE_DIR=$DIR \
  MAILFLEET_E2E_RELEASE=mailfleet MAILFLEET_E2E_RELEASE_NAMESPACE=mailfleet-system \
  cargo test --locked -p mailfleet --test real_cluster -- --ignored
