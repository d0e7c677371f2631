#!/usr/bin/env bash
# Regenerates every generated file from the code: the CRD manifests in crds/ and in the
# Helm chart. Tests fail when these differ from the code.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run -q -p mailfleet -- crdgen
cargo run -q -p mailfleet-proto --example protogen
