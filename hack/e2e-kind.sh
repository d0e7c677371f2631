#!/usr/bin/env bash
# End to end on a real Kubernetes cluster (kind): the image from ./Dockerfile, the Helm chart,
# and a small fleet that must converge.
#
#   1. checks kind, docker (with a reachable daemon), kubectl and helm;
#   2. creates the kind cluster $CLUSTER (or reuses it), with its own kubeconfig file;
#   3. builds the image (docker build) and loads it into the cluster (kind load docker-image);
#   4. installs the chart (image = the one just built; two operator replicas, leader election);
#   5. runs the cluster suite, crates/mailfleet/tests/cluster_e2e.rs, with this cluster's
#      kubeconfig (MAILFLEET_E2E_KUBECONFIG): every file of examples/ through the API server's
#      validation (server-side dry run), an open relay refused, a pool of two relays and a
#      SendingDomain converging (addresses assigned, relays registered with the coordinator
#      over mTLS, DKIM keys made), one message submitted with swaks through kubectl
#      port-forward and a foreign sender refused, scaling to one relay, and the namespace
#      deleted with everything in it;
#   8. deletes the cluster (unless KEEP=1).
#
# CI runs the same suite against devcluster (without MAILFLEET_E2E_KUBECONFIG it starts one,
# with the operator as a process). What kind cannot show: delivery to the Internet. The test
# egress addresses (192.0.2.0/24, TEST-NET-1) are not routed to the pods, so relays accept and
# queue mail but cannot connect out from them; real egress needs hostNetwork or a Multus
# interface carrying your addresses (see the README's operating guide).
#
# usage: hack/e2e-kind.sh
# Env:   CLUSTER (default mailfleet-e2e), IMAGE (default mailfleet:e2e; use a tag other than
#        `latest` so that pods do not try to pull it), KEEP=1 keeps the cluster and prints how
#        to reach it, SKIP_BUILD=1 uses an IMAGE that already exists locally,
#        TIMEOUT (seconds per wait, default 300), KIND_NODE_IMAGE (kind's --image).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CLUSTER=${CLUSTER:-mailfleet-e2e}
IMAGE=${IMAGE:-mailfleet:e2e}
KEEP=${KEEP:-0}
SKIP_BUILD=${SKIP_BUILD:-0}
TIMEOUT=${TIMEOUT:-300}
OPERATOR_NS=mailfleet-system
RELEASE=mailfleet

say() { printf '\n== %s\n' "$*"; }
die() { printf 'e2e-kind: %s\n' "$*" >&2; exit 1; }

need() {
  local tool=$1 hint=$2
  command -v "$tool" >/dev/null 2>&1 || die "$tool is not installed: $hint"
}

# --- 1. tools ---------------------------------------------------------------------------
need docker "install Docker Engine (https://docs.docker.com/engine/install/) or Docker Desktop"
need kind "install kind (https://kind.sigs.k8s.io/docs/user/quick-start/#installation), e.g. 'go install sigs.k8s.io/kind@latest'"
need kubectl "install kubectl (https://kubernetes.io/docs/tasks/tools/), or run hack/install-test-deps.sh and add bin/ to PATH"
need helm "install helm 3.8+ (https://helm.sh/docs/intro/install/), or run hack/install-test-deps.sh and add bin/ to PATH"
need swaks "install swaks (Debian: apt-get install swaks), or run hack/install-test-deps.sh"
need cargo "install Rust (https://rustup.rs): the cluster suite is a cargo test"
docker info >/dev/null 2>&1 \
  || die "docker cannot reach its daemon: start Docker (or check DOCKER_HOST and your permissions on its socket)"
case "$IMAGE" in
  *:latest | *@*) die "IMAGE=$IMAGE: use a fixed tag (not :latest, not a digest) so the loaded image is used as is" ;;
  *:*) ;;
  *) die "IMAGE=$IMAGE: give a repository and a tag, e.g. mailfleet:e2e" ;;
esac
IMAGE_REPO=${IMAGE%:*}
IMAGE_TAG=${IMAGE##*:}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/mailfleet-e2e.XXXXXX")
export KUBECONFIG="$WORK/kubeconfig"
CREATED=0

cleanup() {
  local rc=$?
  if [ "$rc" -ne 0 ] && [ -s "$KUBECONFIG" ]; then
    say "failed (exit $rc): state of the cluster"
    kubectl get relaypools,sendingdomains,warmupplans -A -o wide 2>/dev/null || true
    kubectl -n "$OPERATOR_NS" get pods -o wide 2>/dev/null || true
    kubectl get pods -A -l app.kubernetes.io/name=mailfleet-relay -o wide 2>/dev/null || true
    kubectl -n "$OPERATOR_NS" logs -l app.kubernetes.io/instance="$RELEASE" --tail=50 --prefix 2>/dev/null || true
    kubectl get pods -A -l app.kubernetes.io/name=mailfleet-relay \
      -o jsonpath='{range .items[*]}{.metadata.namespace}{" "}{.metadata.name}{"\n"}{end}' 2>/dev/null \
      | while read -r ns pod; do kubectl -n "$ns" logs "$pod" --tail=30 --prefix 2>/dev/null || true; done
  fi
  if [ "$KEEP" = 1 ]; then
    say "cluster kept: export KUBECONFIG=$KUBECONFIG   (delete: kind delete cluster --name $CLUSTER)"
  elif [ "$CREATED" = 1 ] || kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    say "deleting cluster $CLUSTER"
    kind delete cluster --name "$CLUSTER" || true
    rm -rf "$WORK"
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT

# Waits until `kubectl get "$@"` prints a non-empty, non-zero value (a jsonpath query).
wait_for() {
  local what=$1; shift
  local deadline=$((SECONDS + TIMEOUT)) out
  while :; do
    out=$(kubectl get "$@" 2>/dev/null || true)
    if [ -n "$out" ] && [ "$out" != 0 ]; then
      printf '   %s: %s\n' "$what" "$out"
      return 0
    fi
    [ "$SECONDS" -lt "$deadline" ] || die "timed out after ${TIMEOUT}s waiting for $what"
    sleep 3
  done
}

# --- 2. cluster -------------------------------------------------------------------------
say "kind cluster $CLUSTER"
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  echo "   reusing the existing cluster"
else
  kind create cluster --name "$CLUSTER" --wait "${TIMEOUT}s" ${KIND_NODE_IMAGE:+--image "$KIND_NODE_IMAGE"}
  CREATED=1
fi
kind get kubeconfig --name "$CLUSTER" > "$KUBECONFIG"
kubectl cluster-info

# --- 3. image ---------------------------------------------------------------------------
if [ "$SKIP_BUILD" = 1 ]; then
  say "using the local image $IMAGE"
  docker image inspect "$IMAGE" >/dev/null 2>&1 || die "SKIP_BUILD=1 but $IMAGE does not exist locally"
else
  say "building $IMAGE (the first build compiles the workspace: several minutes)"
  docker build -t "$IMAGE" \
    --build-arg REVISION="$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)" \
    "$ROOT"
fi
kind load docker-image "$IMAGE" --name "$CLUSTER"

# --- 4. chart ---------------------------------------------------------------------------
say "helm install $RELEASE (namespace $OPERATOR_NS)"
# No --wait: only the replica holding the leader Lease is ready, the other one never is.
helm upgrade --install "$RELEASE" "$ROOT/charts/mailfleet" \
  --namespace "$OPERATOR_NS" --create-namespace \
  --set image.repository="$IMAGE_REPO" \
  --set image.tag="$IMAGE_TAG" \
  --set image.pullPolicy=IfNotPresent
wait_for "operator replicas ready (the leader)" \
  -n "$OPERATOR_NS" deployment "$RELEASE" -o 'jsonpath={.status.readyReplicas}'
wait_for "leader Lease holder" -n "$OPERATOR_NS" leases -o 'jsonpath={.items[*].spec.holderIdentity}'
kubectl get crd relaypools.mailfleet.dev sendingdomains.mailfleet.dev warmupplans.mailfleet.dev

# --- 5. the cluster suite ---------------------------------------------------------------
say "the cluster suite (crates/mailfleet/tests/cluster_e2e.rs) against this cluster"
# The same test CI runs against devcluster, here through this kubeconfig: examples/ validated
# by the API server, an open relay refused, a fleet converging, a message submitted with
# swaks through kubectl port-forward, scaling, and the namespace deleted with everything in it.
# With KEEP=1 a failed run also keeps the suite's namespace (mailfleet-e2e-N) to look into.
(cd "$ROOT" && MAILFLEET_E2E_KUBECONFIG="$KUBECONFIG" MAILFLEET_E2E_TIMEOUT="$TIMEOUT" \
  MAILFLEET_E2E_KEEP="$KEEP" \
  cargo test -p mailfleet --test cluster_e2e -- --nocapture)

say "status"
kubectl get relaypools,sendingdomains,warmupplans -A -o wide
kubectl -n "$OPERATOR_NS" get pods -o wide
say "passed"
