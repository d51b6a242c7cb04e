"""`semipd operator`: run the SemiPDService operator (kopf, standalone: one replica, no peering objects)."""
import argparse
import logging
import os
import sys

import kopf
import kubernetes.client
import kubernetes.config
from kopf._core.engines.activities import ActivityError  # not re-exported by kopf

from semipd.operator import handlers, names, reconcile, tokens
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
    p.add_argument("--liveness", metavar="URL", help="serve a liveness probe, e.g. http://0.0.0.0:8080/healthz")
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


def operator_settings(log_level: int) -> kopf.OperatorSettings:
    s = kopf.OperatorSettings()
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
    registry = kopf.OperatorRegistry()
    handlers.register(registry, cfg)
    try:
        kopf.run(registry=registry, settings=operator_settings(level), standalone=True,
                 clusterwide=not args.namespace, namespaces=args.namespace, liveness_endpoint=args.liveness)
    except ActivityError as e:
        # A start-up check failed; kopf has logged which and why. Exit plainly instead of with a traceback.
        print(f"semipd operator: start-up failed: {e.__cause__ or e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
