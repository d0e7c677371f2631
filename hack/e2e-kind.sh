#!/usr/bin/env bash
# End to end on a real Kubernetes cluster (kind): the image from ./Dockerfile, the Helm chart,
# and a small fleet that must converge.
#
#   1. checks kind, docker (with a reachable daemon), kubectl and helm;
#   2. creates the kind cluster $CLUSTER (or reuses it), with its own kubeconfig file;
#   3. builds the image (docker build) and loads it into the cluster (kind load docker-image);
#   4. installs the chart (image = the one just built; two operator replicas, leader election);
#   5. validates every file of examples/ against the real API server (server-side dry run:
#      schema and CEL rules of the CRDs);
#   6. applies a kind-sized fleet: the example WarmupPlan, a RelayPool of two relays and a
#      SendingDomain with `dns.provider: manual`, and waits until the pool is Ready (relays
#      registered with the coordinator over mTLS and configured) and the domain's DKIM keys
#      exist (DKIMReady);
#   7. submits one message over SMTP from a pod inside the cluster to the pool's Service and
#      expects `250 ... queued as`, then shows the status of everything;
#   8. deletes the cluster (unless KEEP=1).
#
# The tests under crates/*/tests start their own devcluster and take no kubeconfig, so the
# cluster-level checks live here. What kind cannot show: delivery to the Internet. The example
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
FLEET_NS=mail
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
    kubectl -n "$FLEET_NS" get pods,pvc -o wide 2>/dev/null || true
    kubectl -n "$OPERATOR_NS" logs -l app.kubernetes.io/instance="$RELEASE" --tail=50 --prefix 2>/dev/null || true
    kubectl -n "$FLEET_NS" logs -l app.kubernetes.io/name=mailfleet-relay --tail=30 --prefix 2>/dev/null || true
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

# --- 5. the examples against the real API server ----------------------------------------
say "examples/ pass the API server's validation (server-side dry run)"
kubectl create namespace "$FLEET_NS" --dry-run=client -o yaml | kubectl apply -f -
kubectl apply --dry-run=server -n "$FLEET_NS" \
  -f "$ROOT/examples/warmupplan.yaml" \
  -f "$ROOT/examples/relaypool.yaml" \
  -f "$ROOT/examples/sendingdomain.yaml"
# And a bad spec is refused with the CRD's own message.
if out=$(kubectl apply --dry-run=server -n "$FLEET_NS" -f - 2>&1 <<'EOF'
apiVersion: mailfleet.dev/v1alpha1
kind: RelayPool
metadata:
  name: open-relay
spec:
  egress:
    addresses: [{address: 192.0.2.1, heloName: mta.example.com}]
  listener:
    allowedNetworks: ["0.0.0.0/0"]
EOF
); then
  die "the API server accepted an open relay (allowedNetworks 0.0.0.0/0)"
fi
grep -q "open relay" <<<"$out" || die "unexpected refusal: $out"
echo "   open relay refused: $(grep -o 'allowedNetworks must not[^"]*' <<<"$out" | head -n 1)"

# --- 6. a kind-sized fleet --------------------------------------------------------------
say "a fleet: WarmupPlan standard, RelayPool e2e (2 relays), SendingDomain e2e.example.test"
kubectl apply -n "$FLEET_NS" -f "$ROOT/examples/warmupplan.yaml"
kubectl apply -n "$FLEET_NS" -f - <<'EOF'
apiVersion: mailfleet.dev/v1alpha1
kind: RelayPool
metadata:
  name: e2e
spec:
  replicas: 2
  spool:
    size: 1Gi            # kind's default StorageClass (local-path) provisions it
  egress:
    mode: bind
    heloNameTemplate: "mta-{ip}.e2e.example.test"
    addresses:
      - address: 192.0.2.10
      - address: 192.0.2.11
      - address: 192.0.2.12
  listener:
    port: 2525
    allowedNetworks: ["10.244.0.0/16"]   # kind's pod network
  delivery:
    retrySchedule: ["1m"]
    maxQueueLifetime: 1h
  warmupPlanRef:
    name: standard
---
apiVersion: mailfleet.dev/v1alpha1
kind: SendingDomain
metadata:
  name: e2e
spec:
  domain: e2e.example.test
  relayPoolRef:
    name: e2e
  dkim:
    algorithm: dual
  dns:
    provider: manual
EOF
kubectl -n "$FLEET_NS" wait relaypool/e2e --for=condition=EgressAssigned --timeout="${TIMEOUT}s"
kubectl -n "$FLEET_NS" wait relaypool/e2e --for=condition=Ready --timeout="${TIMEOUT}s"
kubectl -n "$FLEET_NS" wait sendingdomain/e2e --for=condition=DKIMReady --timeout="${TIMEOUT}s"
wait_for "relays registered with the coordinator" \
  -n "$FLEET_NS" relaypool e2e -o 'jsonpath={.status.relays[*].pod}'

# --- 7. one message in ------------------------------------------------------------------
say "SMTP submission from inside the cluster to the pool's Service"
# A plain SMTP dialogue with pauses (DATA content must not be pipelined before the 354).
dialogue='{ sleep 2; printf "EHLO e2e.test\r\n"; sleep 1;
  printf "MAIL FROM:<app@e2e.example.test>\r\n"; sleep 1;
  printf "RCPT TO:<someone@mailfleet-e2e.invalid>\r\n"; sleep 1;
  printf "DATA\r\n"; sleep 1;
  printf "From: app@e2e.example.test\r\nTo: someone@mailfleet-e2e.invalid\r\nSubject: mailfleet e2e\r\n\r\nhello from kind\r\n.\r\n"; sleep 2;
  printf "QUIT\r\n"; } | nc -w 10 e2e.'"$FLEET_NS"'.svc.cluster.local 2525'
reply=$(kubectl -n "$FLEET_NS" run smtp-probe --image=busybox:1.36 --restart=Never --rm -i --quiet \
  --command -- sh -c "$dialogue" 2>&1) || true
printf '%s\n' "$reply" | sed 's/^/   /'
grep -q "queued as" <<<"$reply" || die "the relay did not accept the message"

# --- status -----------------------------------------------------------------------------
say "status"
kubectl get relaypools,sendingdomains,warmupplans -A -o wide
kubectl -n "$FLEET_NS" get pods,svc,pvc -o wide
kubectl -n "$FLEET_NS" get relaypool e2e -o jsonpath='{range .status.addresses[*]}{.address}{"\t"}{.pod}{"\t"}{.state}{"\n"}{end}'
echo "   DNS records the operator wants published for e2e.example.test:"
kubectl -n "$FLEET_NS" get sendingdomain e2e -o jsonpath='{range .status.records[*]}{"   "}{.name}{" "}{.type}{"\n"}{end}'
say "passed"
