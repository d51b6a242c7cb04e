#!/usr/bin/env bash
# Download, here, the wheels the GPU machine's Python 3.12 lacks for `semipd serve` and bench/gpu/suite.py, and
# print the one device call that runs the suite. The device has no network, so what it needs travels as wheels
# in an ignored folder named in `carry` (the device tool's README: 64 MiB for the whole working tree).
#
#   bench/gpu/prepare.sh [DEST]        DEST: default .whl in the repo root (ignored by .gitignore)
#
# Versions are the ones installed here, where the test suite passes with them. The image already has httpx,
# anyio, h11, click, prometheus-client, torch, triton, transformers, tokenizers, safetensors, jinja2, pyyaml and
# cuda-bindings (bench/gpu/image-packages.txt). typing-extensions is there too, but pydantic needs >= 4.16, newer
# than the image may have, so it travels. xgrammar (structured output) and its apache-tvm-ffi travel too.
# kopf and kubernetes are only for the operator, which nothing here runs.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
dest="${1:-$root/.whl}"
packages=(fastapi starlette pydantic pydantic-core annotated-types typing-inspection typing-extensions uvicorn
          opentelemetry-api xgrammar apache-tvm-ffi)
limit=$((64 * 1024 * 1024))

pins=()
for name in "${packages[@]}"; do
  version="$(python3 -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$name" 2>/dev/null)" ||
    { echo "prepare.sh: $name is not installed here; run pip install -e '.[engine,test]' first" >&2; exit 1; }
  pins+=("$name==$version")
done

mkdir -p "$dest"
rm -f "$dest"/*.whl            # two versions of one package stop the whole install on the device
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" "${pins[@]}"

wheels=("$dest"/*.whl)
count=${#wheels[@]}
if [ "$count" -ne "${#packages[@]}" ]; then
  echo "prepare.sh: expected ${#packages[@]} wheels in $dest, found $count" >&2; exit 1
fi
total=$(cat "$dest"/*.whl | wc -c)
echo "wheels: $count in $dest, $total bytes ($((total / 1024)) KiB) of the 64 MiB the working tree may carry"
if [ "$total" -ge "$limit" ]; then
  echo "prepare.sh: the wheels alone exceed the 64 MiB carry limit" >&2; exit 1
fi

carry="${dest#"$root"/}"
echo "device run:"
echo "  carry:   [\"$carry\"]"
echo "  command: PYTHONUNBUFFERED=1 python3 bench/gpu/suite.py --wheels $carry --out \"\$OUT\""
echo "  timeout_s: 560   (suite budget 500 s; leaves the rest of the 15 device minutes for one rerun)"
