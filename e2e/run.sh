#!/usr/bin/env bash
# End-to-end on kind: build the image, install the CRD and the operator with Helm, serve the tiny model, move its
# SM split in place, scale it, and send one completion. Needs docker, kind, kubectl and helm.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
cluster=semipd-e2e
image=semipd:e2e
say() { echo "e2e: $*" >&2; }
for tool in docker kind kubectl helm; do
    command -v "$tool" >/dev/null || { say "error: '$tool' is not on PATH"; exit 1; }
done

if ! kind get clusters | grep -qx "$cluster"; then
    say "creating kind cluster $cluster"
    kind create cluster --config "$here/kind.yaml" --wait 120s
fi
kubectl config use-context "kind-$cluster" >/dev/null

say "building $image"
docker build -f "$here/Dockerfile" -t "$image" "$repo"
kind load docker-image "$image" --name "$cluster"

say "installing the CRD (server-side, as upgrades must) and the operator"
kubectl apply --server-side -f "$repo/crds/"
helm upgrade --install semipd "$repo/charts/semipd" --namespace semipd-system --create-namespace \
    --set image.repository=semipd --set image.tag=e2e --set image.pullPolicy=Never --wait --timeout 5m

say "serving the tiny model"
kubectl apply -f "$here/example.yaml"
kubectl wait spd/tiny --for=condition=Ready --timeout=10m
kubectl get spd tiny -o wide

say "moving the split in place: no new pods"
pods_before="$(kubectl get pods -l semipd.io/service=tiny -o name | sort)"
kubectl patch spd tiny --type=merge -p '{"spec":{"partition":{"initial":0.25}}}'
for _ in $(seq 60); do
    applied="$(kubectl get spd tiny -o jsonpath='{.status.pods[*].applied}')"
    [[ "$applied" == "prefill=0.25" ]] && break
    sleep 2
done
[[ "$applied" == "prefill=0.25" ]] || { say "error: split not applied (status.pods: $applied)"; exit 1; }
[[ "$(kubectl get pods -l semipd.io/service=tiny -o name | sort)" == "$pods_before" ]] \
    || { say "error: the split change replaced pods"; exit 1; }

say "scaling to 2 through the scale subresource"
kubectl scale spd tiny --replicas=2
kubectl wait spd/tiny --for=condition=Ready --timeout=10m

say "one completion through the Service"
kubectl run curl --rm -i --restart=Never --image=curlimages/curl -- \
    -sf http://tiny:8000/v1/completions -H 'Content-Type: application/json' \
    -d '{"model":"tiny","prompt":"Hello","max_tokens":8}'
say "ok (delete the cluster with: kind delete cluster --name $cluster)"
