"""`semipd operator`: run the SemiPDService operator (kopf). Standalone by default; with --peering, any number of
replicas share a kopf peering object and only the one with the highest priority acts (the others are standbys)."""
import argparse
import asyncio
import logging
import os
import random
import socket
import sys
from urllib.parse import urlsplit

import kopf
import kubernetes.client
import kubernetes.config
from kopf._core.engines.activities import ActivityError  # not re-exported by kopf

from semipd.operator import handlers, health, names, reconcile, tokens
from semipd.operator.kube import Kube


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="semipd operator", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster service account, else $KUBECONFIG "
                                        "or ~/.kube/config)")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[], metavar="NS",
                       help="serve SemiPDServices in this namespace (repeatable)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="serve every namespace (the default)")
    p.add_argument("--http", metavar="HOST:PORT", default="0.0.0.0:8080",
                   help="serve /healthz, /readyz and /metrics (semipd_operator_*) here; 'off' to serve nothing")
    p.add_argument("--liveness", metavar="URL", help="deprecated: the same as --http HOST:PORT of this URL")
    p.add_argument("--peering", metavar="NAME",
                   help="take part in this kopf peering object (a ClusterKopfPeering with --all-namespaces, a "
                        "KopfPeering in each --namespace; kopf.dev/v1, crds/kopfpeering.yaml): only the live peer "
                        "with the highest priority acts. Default: standalone, one replica only")
    p.add_argument("--priority", type=int, default=None,
                   help="peering priority (default: random, so replicas of one Deployment differ: peers of equal "
                        "priority all pause)")
    p.add_argument("--peering-lifetime", type=int, default=60,
                   help="seconds a peer's keep-alive counts: how long a standby waits after the active one dies")
    p.add_argument("--status-interval", type=float, default=30.0,
                   help="seconds between status refreshes of each SemiPDService")
    p.add_argument("--push-timeout", type=float, default=2.0,
                   help="seconds one PUT /admin/partition to a pod may take")
    p.add_argument("--prometheus-timeout", type=float, default=5.0,
                   help="seconds one PromQL query of the SLO control loop may take")
    p.add_argument("--token-key-secret", metavar="NAMESPACE/NAME",
                   help="Secret holding the key every service's admin token is derived from; made when missing "
                        f"(default: {tokens.DEFAULT_KEY_SECRET} in the operator's own namespace: $POD_NAMESPACE, "
                        "the in-cluster service account's, else 'default')")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p.parse_args(argv)


IN_CLUSTER_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def token_key_secret(arg: str | None) -> tuple[str, str]:
    """(namespace, name) of the token key Secret, from --token-key-secret or the defaults it documents."""
    if arg:
        namespace, sep, name = arg.partition("/")
        if not sep or not namespace or not name:
            raise ValueError(f"--token-key-secret must be NAMESPACE/NAME, got {arg!r}")
        return namespace, name
    namespace = os.environ.get("POD_NAMESPACE")
    if not namespace:
        try:
            namespace = open(IN_CLUSTER_NAMESPACE).read().strip()
        except OSError:
            namespace = ""
    return namespace or "default", tokens.DEFAULT_KEY_SECRET


def client_configuration(kubeconfig: str | None) -> kubernetes.client.Configuration:
    cfg = kubernetes.client.Configuration()
    if kubeconfig:
        kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        return cfg
    try:
        kubernetes.config.load_incluster_config(client_configuration=cfg)
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(client_configuration=cfg)
    return cfg


def http_address(args: argparse.Namespace) -> tuple[str, int] | None:
    """(host, port) to serve the probes and metrics on, or None for --http off."""
    if args.liveness:
        url = urlsplit(args.liveness)
        return url.hostname or "0.0.0.0", url.port or 8080
    if args.http == "off":
        return None
    host, sep, port = args.http.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--http must be HOST:PORT or off, got {args.http!r}")
    return host or "0.0.0.0", int(port)


def peering(args: argparse.Namespace) -> health.Peering | None:
    if not args.peering:
        return None
    identity = f"{socket.gethostname()}/{os.getpid()}/{random.randrange(16 ** 6):06x}"
    priority = args.priority if args.priority is not None else random.randrange(1, 2 ** 31)
    return health.Peering(name=args.peering, identity=identity, priority=priority,
                          clusterwide=not args.namespace, namespaces=tuple(args.namespace))


def operator_settings(log_level: int, peer: health.Peering | None = None,
                      peering_lifetime: int = 60) -> kopf.OperatorSettings:
    s = kopf.OperatorSettings()
    if peer is None:
        s.peering.standalone = True
    else:
        # Mandatory: with the peering object or its CRD missing, kopf pauses instead of acting alone.
        s.peering.standalone, s.peering.mandatory = False, True
        s.peering.name, s.peering.priority = peer.name, peer.priority
        s.peering.lifetime = peering_lifetime
        s.peering.stealth = True   # keep-alives are not logged each time; pauses and resumes still are
    # kopf's bookkeeping lives under our domain, in annotations only (status.kopf would be pruned by the schema).
    s.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=names.GROUP)
    s.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=names.GROUP)
    # kopf adds a finalizer to objects with a timer, to stop the timer before the object goes; name it ours.
    s.persistence.finalizer = names.FINALIZER
    # Bounded watches: a silently dead connection is noticed within minutes, not never.
    s.watching.server_timeout = 300
    s.watching.client_timeout = 330
    s.watching.connect_timeout = 30
    # Children are watched only for the operator's own objects, filtered by the API server, not after the
    # fact (kopf >= 1.45; older kopf still filters through the handlers' labels=).
    if hasattr(s.watching, "label_selectors"):
        for resource in (("apps", "v1", "deployments"), ("v1", "services"), ("v1", "pods")):
            s.watching.label_selectors[resource] = f"{names.MANAGED_BY_LABEL}={names.MANAGED_BY}"
    # The CRD must exist at start (checked); watching CRDs and namespaces would only need wider RBAC.
    s.scanning.disabled = True
    s.posting.level = max(log_level, logging.INFO)
    s.posting.reporting_component = names.MANAGED_BY
    s.networking.request_timeout = 60
    # Split pushes wait on pods; a few slow ones must not starve the other services' handlers.
    s.execution.max_workers = 16
    return s


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    level = getattr(logging, args.log_level.upper())
    kopf.configure(verbose=level <= logging.DEBUG, quiet=level >= logging.WARNING)
    try:
        connection = client_configuration(args.kubeconfig)
    except (kubernetes.config.ConfigException, OSError) as e:
        print(f"semipd operator: cannot load cluster credentials: {e}", file=sys.stderr)
        return 2
    try:
        key_secret = token_key_secret(args.token_key_secret)
    except ValueError as e:
        print(f"semipd operator: {e}", file=sys.stderr)
        return 2
    cfg = handlers.OperatorConfig(
        kube=Kube(kubernetes.client.ApiClient(connection), field_manager=names.MANAGED_BY),
        connection=connection, status_interval=args.status_interval,
        settings=reconcile.Settings(push_timeout=args.push_timeout, prometheus_timeout=args.prometheus_timeout),
        namespaces=tuple(args.namespace), token_key_secret=key_secret)
    try:
        address = http_address(args)
    except ValueError as e:
        print(f"semipd operator: {e}", file=sys.stderr)
        return 2
    peer = peering(args)
    registry = kopf.OperatorRegistry()
    handlers.register(registry, cfg)
    try:
        asyncio.run(serve(args, cfg, registry, operator_settings(level, peer, args.peering_lifetime), peer, address))
    except ActivityError as e:
        # A start-up check failed; kopf has logged which and why. Exit plainly instead of with a traceback.
        print(f"semipd operator: start-up failed: {e.__cause__ or e}", file=sys.stderr)
        return 1
    return 0


async def serve(args, cfg: handlers.OperatorConfig, registry, settings: kopf.OperatorSettings,
                peer: health.Peering | None, address: tuple[str, int] | None) -> None:
    """kopf's operator and our HTTP endpoint in one event loop (health.py says why not kopf's liveness one)."""
    state = health.Health(peering=peer)
    runner = await state.serve(*address) if address else None
    tasks = []
    if peer is not None:
        log.info("peering %r as %s with priority %d", peer.name, peer.identity, peer.priority)
        tasks.append(asyncio.create_task(state.watch_role(
            lambda: peering_status(cfg, peer), interval=max(1.0, min(5.0, args.peering_lifetime / 4)))))
    try:
        await kopf.operator(registry=registry, settings=settings, clusterwide=not args.namespace,
                            namespaces=args.namespace, ready_flag=state.started,
                            identity=peer.identity if peer else None,
                            peering_name=peer.name if peer else None, standalone=peer is None,
                            priority=peer.priority if peer else None)
    finally:
        for t in tasks:
            t.cancel()
        if runner is not None:
            await runner.cleanup()


def peering_status(cfg: handlers.OperatorConfig, peer: health.Peering) -> dict:
    """The peers' records in our peering object (the first namespace's, when namespaced: kopf keeps one per
    namespace and acts in all of them by the same rule)."""
    if peer.clusterwide:
        obj = cfg.kube.get_or_none("kopf.dev/v1", "clusterkopfpeerings", None, peer.name)
    else:
        obj = cfg.kube.get_or_none("kopf.dev/v1", "kopfpeerings", peer.namespaces[0], peer.name)
    return (obj or {}).get("status") or {}


log = logging.getLogger("semipd.operator")

if __name__ == "__main__":
    sys.exit(main())
