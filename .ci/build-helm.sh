#!/usr/bin/env bash
# Build helm from the Go module proxy once and cache it outside the repository (no binary downloads here).
# Prints the binary path as the last line of stdout.
set -euo pipefail
version="v3.16.4"
dir="${SEMIPD_CACHE:-$HOME/.cache/semipd}/helm/$version"
if [[ -x "$dir/helm" ]]; then
    echo "build-helm: cached: $dir/helm" >&2
    echo "$dir/helm"
    exit 0
fi
command -v go >/dev/null || { echo "build-helm: error: 'go' is not on PATH" >&2; exit 1; }
echo "build-helm: building helm $version from Go modules into $dir (several minutes on 2 cores)" >&2
mkdir -p "$dir"
GOBIN="$dir" go install -trimpath -ldflags="-s -w" "helm.sh/helm/v3/cmd/helm@$version" >&2
echo "$dir/helm"
