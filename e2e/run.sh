#!/usr/bin/env bash
# From an empty machine with Docker to a kind cluster serving the embedded tiny model, end to end:
#   1. a one-node kind cluster (kind.yaml);
#   2. the CPU engine image and the slim operator image from docker/, loaded into kind;
#   3. the CRDs (server-side, as upgrades must be applied) and the operator with the Helm chart;
#   4. a plain Prometheus that scrapes the engine pods as a PodMonitor would (prometheus.yaml);
#   5. the SemiPDService of example.yaml, until Ready;
#   6. requests through `kubectl port-forward` (models, a chat completion, /metrics);
#   7. `semipd bench` load from inside the cluster, until the SLO loop has moved the pod's SM split in place
#      (same pod, no restart), then the decision history and events;
#   8. `kubectl scale` through the scale subresource.
# Needs docker (a running daemon), kind, kubectl, helm and curl: see e2e/README.md.
#
#   e2e/run.sh            # run it; the cluster stays up for you to look around
#   e2e/run.sh --delete   # run it, then delete the cluster
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
cluster="${SEMIPD_E2E_CLUSTER:-semipd-e2e}"
port="${SEMIPD_E2E_PORT:-18000}"
engine_image=semipd-cpu:e2e        # example.yaml names this image
operator_image=semipd-operator:e2e
delete_after=false

usage() { echo "usage: $0 [--delete]" >&2; exit 2; }
case "${1:-}" in
    "") ;;
    --delete) delete_after=true ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) usage ;;
esac

step=0
say() { echo "e2e: $*" >&2; }
next() { step=$((step + 1)); echo >&2; say "[$step/8] $*"; }
die() { say "error: $*"; exit 1; }
need() { command -v "$1" >/dev/null || die "'$1' is not on PATH; install it: $2"; }

need docker "https://docs.docker.com/engine/install/"
need kind "https://kind.sigs.k8s.io/docs/user/quick-start/#installation (v0.24 or newer)"
need kubectl "https://kubernetes.io/docs/tasks/tools/"
need helm "https://helm.sh/docs/intro/install/ (v3.14 or newer)"
need curl "your distribution's curl package"
docker info >/dev/null 2>&1 || die "the Docker daemon does not answer 'docker info': start it, or add yourself to the docker group"

# Retries a check every 2 s until it succeeds or `seconds` pass: wait_for SECONDS WHAT COMMAND...
wait_for() {
    local seconds="$1" what="$2"
    shift 2
    local deadline=$((SECONDS + seconds))
    until "$@"; do
        ((SECONDS < deadline)) || die "timed out after ${seconds}s waiting for $what"
        sleep 2
    done
}

pf_pid=""
cleanup() {
    [[ -z "$pf_pid" ]] || kill "$pf_pid" 2>/dev/null || true
    kubectl delete pod tiny-load --ignore-not-found --wait=false >/dev/null 2>&1 || true
    if $delete_after; then
        say "deleting the cluster"
        kind delete cluster --name "$cluster"
    fi
}
trap cleanup EXIT

next "kind cluster $cluster"
if kind get clusters 2>/dev/null | grep -qx "$cluster"; then
    say "reusing the existing cluster"
else
    kind create cluster --name "$cluster" --config "$here/kind.yaml" --wait 180s
fi
kubectl config use-context "kind-$cluster" >/dev/null

next "images $engine_image and $operator_image (docker/; the first build downloads torch's CPU wheels)"
docker build -f "$repo/docker/engine-cpu.Dockerfile" -t "$engine_image" "$repo"
docker build -f "$repo/docker/operator.Dockerfile" -t "$operator_image" "$repo"
kind load docker-image "$engine_image" "$operator_image" --name "$cluster"

next "CRDs (server-side apply) and the operator (Helm)"
kubectl apply --server-side -f "$repo/crds/"
helm upgrade --install semipd "$repo/charts/semipd" --namespace semipd-system --create-namespace \
    --set image.repository="${operator_image%:*}" --set image.tag="${operator_image#*:}" \
    --set image.pullPolicy=Never --wait --timeout 5m

next "Prometheus (monitoring/prometheus)"
kubectl apply -f "$here/prometheus.yaml"
kubectl -n monitoring rollout status deployment/prometheus --timeout=5m

next "the SemiPDService 'tiny' (example.yaml)"
kubectl apply -f "$here/example.yaml"
kubectl wait spd/tiny --for=condition=Ready --timeout=10m
kubectl get spd tiny -o wide
# name=restarts of every engine pod: what must not change while the split moves
pods() { kubectl get pods -l semipd.io/service=tiny \
    -o jsonpath='{range .items[*]}{.metadata.name}={.status.containerStatuses[0].restartCount}{"\n"}{end}' | sort; }
applied() { kubectl get spd tiny -o jsonpath='{.status.pods[0].applied}'; }
has_applied() { [[ -n "$(applied)" ]]; }
wait_for 120 "status.pods[0].applied (the split the engine reports)" has_applied
pods_before="$(pods)"
split_before="$(applied)"
say "pods: $(echo "$pods_before" | tr '\n' ' ')split: $split_before"

next "requests through a port-forward on 127.0.0.1:$port"
kubectl port-forward service/tiny "$port:8000" >/dev/null 2>&1 &
pf_pid=$!
wait_for 60 "the port-forward" curl -sf "http://127.0.0.1:$port/health" -o /dev/null
curl -sf "http://127.0.0.1:$port/v1/models"
echo
curl -sf "http://127.0.0.1:$port/v1/chat/completions" -H 'Content-Type: application/json' \
    -d '{"model": "tiny", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 16}'
echo
curl -sf "http://127.0.0.1:$port/metrics" | grep -E '^semipd:sm_count|^vllm:num_requests_running' || true

next "load from inside the cluster until the SLO loop moves the split"
kubectl run tiny-load --image="$engine_image" --image-pull-policy=Never --restart=Never -- \
    bench --url http://tiny:8000 --model tiny --rate 4 --duration 300 --input-len 256 --output-len 32 \
    --slo-ttft 0.5 --slo-tpot 0.1 --no-progress
split_moved() {
    local now
    now="$(applied)"
    [[ -n "$now" && "$now" != "$split_before" ]]
}
wait_for 300 "status.pods[0].applied to move from $split_before" split_moved
say "split moved: $split_before -> $(applied)"
kubectl get spd tiny -o wide
kubectl get spd tiny -o jsonpath=\
    '{range .status.history[*]}{.time} {.kind} {.pod} {.from} -> {.to} ({.reason}) {.message}{"\n"}{end}'
kubectl get events --field-selector reason=SplitChanged --sort-by=.lastTimestamp | tail -n 5
[[ "$(pods)" == "$pods_before" ]] || die "the split change replaced or restarted pods: $(pods | tr '\n' ' ')"
say "same pods, no restarts: $(echo "$pods_before" | tr '\n' ' ')"
kubectl delete pod tiny-load --wait=false >/dev/null

next "scaling to 2 through the scale subresource"
kubectl scale spd tiny --replicas=2
two_ready() { [[ "$(kubectl get spd tiny -o jsonpath='{.status.readyReplicas}')" == 2 ]]; }
wait_for 600 "2 ready pods" two_ready
kubectl get spd tiny -o wide

echo >&2
say "ok. Try: kubectl port-forward service/tiny 8000:8000, then the README's OpenAI client examples."
$delete_after || say "delete the cluster with: kind delete cluster --name $cluster"
