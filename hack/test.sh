#!/usr/bin/env bash
# The full test suite: installs the test peers, then formatting, lints, generated-file drift,
# every test of the workspace (end-to-end ones on devcluster), and the cluster suite again on
# a real Kubernetes control plane with the chart installed. The README's second command.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
bash hack/install-test-deps.sh
export PATH="$ROOT/bin:$ROOT/.venv/bin:/usr/sbin:$PATH"
export HELM="$ROOT/bin/helm" KUBECTL="$ROOT/bin/kubectl"

echo "== cargo fmt"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== generated files"
cargo run -q --locked -p mailfleet -- crdgen --check
echo "== cargo test"
cargo test --workspace --locked
echo "== cluster suite on a real control plane (kube-apiserver, etcd, controller manager, scheduler)"
bash hack/e2e-kube.sh
