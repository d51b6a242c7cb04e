#!/usr/bin/env bash
# Build kubectl (tests/kubectl/: the upstream command, k8s.io/kubectl) from the Go module proxy once and cache it
# outside the repository, keyed on its go.mod and go.sum. For machines without a kubectl on PATH: the cluster tier
# runs README's kubectl lines with it. Prints the binary path as the last line of stdout.
set -euo pipefail
src="$(cd "$(dirname "${BASH_SOURCE[0]}")/../tests/kubectl" && pwd)"
command -v go >/dev/null || { echo "build-kubectl: error: 'go' is not on PATH" >&2; exit 1; }
hash="$(cat "$src/go.mod" "$src/go.sum" "$src/main.go" | sha256sum | cut -c1-16)"
dir="${SEMIPD_CACHE:-$HOME/.cache/semipd}/kubectl/$hash"
if [[ -x "$dir/kubectl" ]]; then
    echo "build-kubectl: cached: $dir/kubectl" >&2
    echo "$dir/kubectl"
    exit 0
fi
echo "build-kubectl: building kubectl from Go modules into $dir (several minutes on 2 cores)" >&2
mkdir -p "$dir"
(cd "$src" && go build -trimpath -ldflags="-s -w" -o "$dir/kubectl" .) >&2
echo "$dir/kubectl"
