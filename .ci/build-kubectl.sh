#!/usr/bin/env bash
# Build kubectl (tests/kubectl/: the upstream command, k8s.io/kubectl) from the Go module proxy once and cache it
# outside the repository, keyed on its sources. The cluster tier runs README's kubectl lines with it: the same
# Kubernetes minor as the control plane, whatever kubectl a machine has. Prints the binary's path last on stdout.
set -euo pipefail
src="$(cd "$(dirname "${BASH_SOURCE[0]}")/../tests/kubectl" && pwd)"
command -v go >/dev/null || { echo "build-kubectl: error: 'go' is not on PATH" >&2; exit 1; }
hash="$(cat "${BASH_SOURCE[0]}" "$src/go.mod" "$src/go.sum" "$src/main.go" | sha256sum | cut -c1-16)"
dir="${SEMIPD_CACHE:-$HOME/.cache/semipd}/kubectl/$hash"
if [[ -x "$dir/kubectl" ]]; then
    echo "build-kubectl: cached: $dir/kubectl" >&2
    echo "$dir/kubectl"
    exit 0
fi
echo "build-kubectl: building kubectl from Go modules into $dir (several minutes on 2 cores)" >&2
mkdir -p "$dir"
# k8s.io/kubectl v0.N.P is Kubernetes v1.N.P: stamp it, so `kubectl version` names it
staging="$(awk '$1 == "k8s.io/kubectl" {print $2; exit}' "$src/go.mod")"
(cd "$src" && go build -trimpath -ldflags="-s -w -X k8s.io/component-base/version.gitVersion=v1.${staging#v0.}" \
    -o "$dir/kubectl" .) >&2
echo "$dir/kubectl"
