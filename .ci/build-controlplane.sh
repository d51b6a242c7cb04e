#!/usr/bin/env bash
# Build semipd-controlplane (embedded etcd + kube-apiserver + kube-controller-manager, tests/controlplane/)
# once and cache it outside the repository, keyed on its go.mod, go.sum, Go sources and the Go version.
# Needs only Go and the Go module proxy. Prints progress on stderr and the binary's path as the last line
# of stdout, so callers can do:  bin=$(.ci/build-controlplane.sh | tail -n1)
# With --cached it only looks: prints the path and exits 0 if the binary is built, else exits 3.
set -euo pipefail
mode="${1:-build}"
case "$mode" in build|--cached) ;; *) echo "usage: $0 [--cached]" >&2; exit 2 ;; esac

src="$(cd "$(dirname "${BASH_SOURCE[0]}")/../tests/controlplane" && pwd)"
cache="${SEMIPD_CACHE:-$HOME/.cache/semipd}/controlplane"
say() { echo "build-controlplane: $*" >&2; }

command -v go >/dev/null || { say "error: 'go' is not on PATH (Go >= 1.26 is needed)"; exit 1; }

script="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
hash="$(cd "$src" && { go version; cat "$script" go.mod go.sum; for f in $(ls *.go | LC_ALL=C sort); do echo "== $f"; cat "$f"; done; } \
        | sha256sum | cut -c1-16)"
dir="$cache/$hash"
bin="$dir/semipd-controlplane"
if [[ -x "$bin" ]]; then
    say "cached: $bin"
    echo "$bin"
    exit 0
fi
if [[ "$mode" == --cached ]]; then
    say "not built yet for this source (would be $bin); run .ci/build-controlplane.sh"
    exit 3
fi

k8s_version="$(awk '$1 == "k8s.io/kubernetes" {print $2; exit}' "$src/go.mod")"
minor="${k8s_version#v1.}"; minor="${minor%%.*}"
mkdir -p "$dir"
log="$dir/build.log"
say "building Kubernetes $k8s_version control plane into $dir (a cold build takes tens of minutes on 2 cores)"
say "step 1/2: downloading Go modules"
(cd "$src" && go mod download) 2>&1 | tee "$log" >&2

say "step 2/2: compiling (progress every 100 packages; full log: $log)"
start=$SECONDS
tmp="$dir/.semipd-controlplane.$$"
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$k8s_version \
-X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"
set +e
(cd "$src" && go build -v -trimpath -buildvcs=false -ldflags="$ldflags" -o "$tmp" .) 2>&1 | tee -a "$log" \
    | awk '{ n++; if (n % 100 == 0) { printf "build-controlplane:   %d packages compiled\n", n > "/dev/stderr"; fflush() } }'
rc=${PIPESTATUS[0]}
set -e
if [[ $rc -ne 0 || ! -x "$tmp" ]]; then
    rm -f "$tmp"
    say "error: go build failed (exit $rc); last lines of $log:"
    tail -n 40 "$log" >&2
    exit 1
fi
mv -f "$tmp" "$bin"  # atomic: a concurrent caller sees either no binary or a whole one
say "built in $((SECONDS - start))s: $bin ($(du -h "$bin" | cut -f1))"
echo "$bin"
