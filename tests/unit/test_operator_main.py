"""`semipd operator` wiring: kopf keeps its state under semipd.io, the CLI scopes namespaces, bad credentials
are a clear error, and a rejected generation is not retried by background passes."""
import kopf
import kubernetes.client
import pytest
import yaml

from semipd.operator import handlers, main, names

pytestmark = pytest.mark.unit


def test_kopf_settings_use_our_domain():
    s = main.operator_settings(20)
    assert s.persistence.finalizer == "semipd.io/finalizer"
    assert s.persistence.progress_storage.prefix == "semipd.io"
    assert s.persistence.diffbase_storage.prefix == "semipd.io"
    assert s.scanning.disabled and s.watching.client_timeout and s.watching.server_timeout
    assert s.posting.reporting_component == names.MANAGED_BY


def test_cli_scopes():
    assert main.parse_args([]).namespace == []
    assert main.parse_args(["-n", "a", "--namespace", "b"]).namespace == ["a", "b"]
    with pytest.raises(SystemExit):
        main.parse_args(["-n", "a", "-A"])


def test_unusable_credentials_are_a_clear_error(tmp_path, capsys):
    assert main.main(["--kubeconfig", str(tmp_path / "missing")]) == 2
    assert "cannot load cluster credentials" in capsys.readouterr().err


def test_kopf_login_uses_the_same_credentials(tmp_path):
    kubeconfig = tmp_path / "kc"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:6443", "insecure-skip-tls-verify": True}}],
        "users": [{"name": "u", "user": {"token": "abc123"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
    cfg = main.client_configuration(str(kubeconfig))
    info = handlers.connection_info(cfg)
    assert (info.server, info.scheme, info.token, info.insecure) == ("https://127.0.0.1:6443", "Bearer", "abc123",
                                                                     True)
    assert isinstance(cfg, kubernetes.client.Configuration)


def test_only_a_failed_current_generation_is_skipped():
    def body(generation, reason, seen):
        return {"metadata": {"generation": generation}, "status": {"conditions": [
            {"type": "Progressing", "status": "False", "reason": reason, "observedGeneration": seen}]}}
    assert handlers.was_rejected(body(2, "ApplyFailed", 2))
    assert handlers.was_rejected(body(2, "InvalidSpec", 2))
    assert not handlers.was_rejected(body(3, "ApplyFailed", 2))   # the spec changed since: try it
    assert not handlers.was_rejected(body(2, "Forbidden", 2))     # RBAC can be fixed without a spec change
    assert not handlers.was_rejected(body(2, "Complete", 2))


def test_the_spec_handler_gives_a_lasting_conflict_up_after_bounded_retries():
    registry = kopf.OperatorRegistry()
    handlers.register(registry, handlers.OperatorConfig(kube=None, connection=None))
    spec = [h for h in registry._changing.get_all_handlers() if h.id == "reconcile"]
    assert len(spec) == 3                                  # resume, create, update
    assert all(h.retries == handlers.SPEC_RETRIES and 0 < h.retries <= 20 for h in spec)
    # the refresh timer is the level-triggered loop that converges once a conflict clears: it never gives up
    timers = [h for h in registry._spawning.get_all_handlers() if h.id == "refresh"]
    assert timers and all(h.retries is None for h in timers)


def test_http_address_and_peering_flags():
    assert main.http_address(main.parse_args([])) == ("0.0.0.0", 8080)
    assert main.http_address(main.parse_args(["--http", "127.0.0.1:9"])) == ("127.0.0.1", 9)
    assert main.http_address(main.parse_args(["--http", "off"])) is None
    assert main.http_address(main.parse_args(["--liveness", "http://0.0.0.0:8081/healthz"])) == ("0.0.0.0", 8081)
    assert main.peering(main.parse_args([])) is None
    assert main.operator_settings(20).peering.standalone
    a, b = (main.peering(main.parse_args(["--peering", "p"])) for _ in range(2))
    assert a.priority != b.priority and a.identity != b.identity and a.clusterwide   # random: replicas differ
    s = main.operator_settings(20, a, 15)
    assert (s.peering.standalone, s.peering.mandatory, s.peering.name, s.peering.lifetime) == (False, True, "p", 15)


def test_peering_role_follows_kopfs_rule():
    from datetime import datetime, timedelta, timezone

    from semipd.operator import health
    now = datetime(2030, 1, 1, tzinfo=timezone.utc)
    me = health.Peering(name="p", identity="me", priority=10, clusterwide=True)

    def peer(priority, age):
        return {"priority": priority, "lifetime": 60, "lastseen": (now - timedelta(seconds=age)).isoformat()}
    assert health.role_from({}, me, now) == "unknown"                                  # kopf has not touched it
    assert health.role_from({"me": peer(10, 0)}, me, now) == "active"
    assert health.role_from({"me": peer(10, 0), "b": peer(5, 0)}, me, now) == "active"
    assert health.role_from({"me": peer(10, 0), "b": peer(20, 0)}, me, now) == "standby"
    assert health.role_from({"me": peer(10, 0), "b": peer(10, 0)}, me, now) == "standby"   # equal: all pause
    assert health.role_from({"me": peer(10, 0), "b": peer(20, 61)}, me, now) == "active"   # expired
