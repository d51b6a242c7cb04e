"""The control plane the cluster and system tiers share: a real kube-apiserver + etcd (+ kube-controller-manager)
on loopback. tests/conftest.py turns it into the `control_plane` (one per session) and `namespace` fixtures and
imports this module only when a test asks for them, so the unit tier never loads it.

Where it comes from, first match wins:
1. ``KUBEBUILDER_ASSETS``: a directory with ``etcd`` and ``kube-apiserver``, and ``kube-controller-manager``
   if present (without it there are no workload controllers and no garbage collection);
2. the ``semipd-controlplane`` program (tests/controlplane/) cached by ``.ci/build-controlplane.sh``.
   With ``SEMIPD_BUILD_CONTROLPLANE=1`` the fixture builds it when missing, streaming progress (a cold
   build takes tens of minutes: raise pytest's --timeout for that run).

When neither is there the cluster and system tests skip, saying how to get one; with ``SEMIPD_REQUIRE_CLUSTER=1``
(CI sets it) they fail instead. There is no kubelet and no scheduler: pods stay Pending.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import os
import re
import socket
import ssl
import subprocess
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import kubernetes
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = REPO / ".ci" / "build-controlplane.sh"
READY_TIMEOUT_S = float(os.environ.get("SEMIPD_CONTROLPLANE_TIMEOUT", "180"))
HOW_TO_GET = (
    "build the control plane once with `.ci/build-controlplane.sh` (needs Go >= 1.26 and the Go module proxy; "
    "tens of minutes cold, cached afterwards), or set KUBEBUILDER_ASSETS to a directory holding etcd and "
    "kube-apiserver (and kube-controller-manager)"
)
READY_LINE = re.compile(r"^ready server=(\S+) kubeconfig=(\S+)$", re.MULTILINE)


class ControlPlaneUnavailable(Exception):
    """The control plane cannot be had here; the message says why."""


@dataclass
class ControlPlane:
    kubeconfig: str  # admin (system:masters) kubeconfig, certificates inline
    server: str  # https://127.0.0.1:PORT
    has_controllers: bool  # kube-controller-manager runs: workload controllers and garbage collection
    source: str
    logs: list[Path] = field(default_factory=list)

    def api_client(self, token: str | None = None) -> kubernetes.client.ApiClient:
        """A client as the admin, or, with ``token``, as whoever the bearer token belongs to."""
        cfg = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(config_file=self.kubeconfig, client_configuration=cfg)
        if token is not None:
            cfg.cert_file = cfg.key_file = None
            cfg.api_key = {"authorization": f"Bearer {token}"}
        return kubernetes.client.ApiClient(configuration=cfg)

    def env(self) -> dict[str, str]:
        """Environment for a subprocess (an operator, kubectl) that should talk to this cluster."""
        return {**os.environ, "KUBECONFIG": self.kubeconfig}

    def require_controllers(self) -> None:
        if not self.has_controllers:
            unavailable(
                f"{self.source} has no kube-controller-manager, so there are no workload controllers and no "
                "garbage collection; add kube-controller-manager to KUBEBUILDER_ASSETS or unset it to use "
                "the semipd-controlplane build"
            )

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(_tail(p, lines) for p in self.logs)


def unavailable(reason: str) -> None:
    """Skip, or fail where the cluster tier must run (SEMIPD_REQUIRE_CLUSTER=1)."""
    if os.environ.get("SEMIPD_REQUIRE_CLUSTER") == "1":
        pytest.fail(f"cluster tier required (SEMIPD_REQUIRE_CLUSTER=1) but: {reason}", pytrace=False)
    pytest.skip(reason)


def run_control_plane(request, tmp_path_factory, admission_plugins: tuple[str, ...] = ()):
    """Generator behind the `control_plane` fixture: start, yield the ControlPlane, stop. `admission_plugins` are
    enabled on top of kube-apiserver's default set (as `--enable-admission-plugins`), for a control plane as strict
    as some distributions run theirs."""
    workdir = tmp_path_factory.mktemp("controlplane")
    procs: list[tuple[str, subprocess.Popen]] = []
    try:
        assets = os.environ.get("KUBEBUILDER_ASSETS")
        if assets:
            cp = _start_from_assets(Path(assets), workdir, procs, admission_plugins)
        else:
            cp = _start_program(_find_program(request), workdir, procs, admission_plugins)
    except ControlPlaneUnavailable as e:
        _stop(procs)
        unavailable(f"{e}. To get one: {HOW_TO_GET}")
    except BaseException:
        _stop(procs)
        raise
    yield cp
    _stop(procs)


def fresh_namespace(control_plane: ControlPlane):
    """Generator behind the `namespace` fixture: a fresh namespace, deleted afterwards (without waiting:
    deletion finishes in the background)."""
    core = kubernetes.client.CoreV1Api(control_plane.api_client())
    name = f"t-{uuid.uuid4().hex[:10]}"
    core.create_namespace(kubernetes.client.V1Namespace(metadata=kubernetes.client.V1ObjectMeta(name=name)))
    yield name
    try:
        core.delete_namespace(name)
    except kubernetes.client.ApiException as e:
        if e.status != 404:
            raise


# ---- the semipd-controlplane program ----------------------------------------------------------------------


def _find_program(request) -> Path:
    if not BUILD_SCRIPT.exists():
        raise ControlPlaneUnavailable(f"{BUILD_SCRIPT} is missing")
    found = subprocess.run(["bash", str(BUILD_SCRIPT), "--cached"], capture_output=True, text=True)
    if found.returncode == 0:
        return Path(found.stdout.strip().splitlines()[-1])
    if os.environ.get("SEMIPD_BUILD_CONTROLPLANE") != "1":
        raise ControlPlaneUnavailable(f"semipd-controlplane is not built ({found.stderr.strip()})")
    # Show the build's progress live: pytest would otherwise hold it back until the test ends.
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        built = subprocess.run(["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, text=True)
    if built.returncode != 0:
        raise ControlPlaneUnavailable(f"{BUILD_SCRIPT} failed with exit code {built.returncode} (its output is above)")
    return Path(built.stdout.strip().splitlines()[-1])


def _start_program(program: Path, workdir: Path, procs: list, admission_plugins: tuple[str, ...] = ()) -> ControlPlane:
    log = workdir / "controlplane.log"
    cmd = [
        str(program),
        f"--data-dir={workdir / 'data'}",
        "--port=0",
        f"--kubeconfig-out={workdir / 'admin.kubeconfig'}",
        f"--ready-timeout={int(READY_TIMEOUT_S)}s",
    ]
    if admission_plugins:
        cmd.append(f"--enable-admission-plugins={','.join(admission_plugins)}")
    procs.append(("semipd-controlplane", _spawn(cmd, log)))

    def ready():
        m = READY_LINE.search(log.read_text(errors="replace"))
        return m and (m.group(1), m.group(2))

    server, kubeconfig = _wait("semipd-controlplane to print its ready line", ready, procs, [log])
    return ControlPlane(kubeconfig, server, True, f"semipd-controlplane ({program})", [log])


# ---- KUBEBUILDER_ASSETS: the same control plane from separate binaries ------------------------------------


def _start_from_assets(assets: Path, workdir: Path, procs: list, admission_plugins: tuple[str, ...] = ()) -> ControlPlane:
    etcd, apiserver, kcm = assets / "etcd", assets / "kube-apiserver", assets / "kube-controller-manager"
    for binary in (etcd, apiserver):
        if not os.access(binary, os.X_OK):
            raise ControlPlaneUnavailable(f"KUBEBUILDER_ASSETS={assets} has no executable {binary.name}")
    pki = _write_pki(workdir / "pki")
    etcd_url, peer_url = f"http://127.0.0.1:{_free_port()}", f"http://127.0.0.1:{_free_port()}"
    etcd_log = workdir / "etcd.log"
    procs.append(("etcd", _spawn([
        str(etcd), f"--data-dir={workdir / 'etcd'}", "--name=semipd",
        f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
        f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
        f"--initial-cluster=semipd={peer_url}", "--unsafe-no-fsync", "--log-level=error",
    ], etcd_log)))

    port = _free_port()
    server = f"https://127.0.0.1:{port}"
    kubeconfig = workdir / "admin.kubeconfig"
    _write_kubeconfig(kubeconfig, server, pki, "admin")
    api_log = workdir / "kube-apiserver.log"
    # Same flags as tests/controlplane/apiserver.go; keep the two in step.
    procs.append(("kube-apiserver", _spawn([
        str(apiserver), "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={port}",
        f"--etcd-servers={etcd_url}", f"--tls-cert-file={pki['apiserver'][0]}",
        f"--tls-private-key-file={pki['apiserver'][1]}", f"--client-ca-file={pki['ca'][0]}",
        "--authorization-mode=RBAC", "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        f"--service-account-key-file={pki['sa']}", f"--service-account-signing-key-file={pki['sa']}",
        "--service-cluster-ip-range=10.96.0.0/16", "--endpoint-reconciler-type=none", "--profiling=false",
        *([f"--enable-admission-plugins={','.join(admission_plugins)}"] if admission_plugins else []),
    ], api_log)))
    logs = [etcd_log, api_log]
    _wait("kube-apiserver /readyz", lambda: _readyz(server, pki), procs, logs)

    has_kcm = os.access(kcm, os.X_OK)
    if has_kcm:
        kcm_kubeconfig = workdir / "controller-manager.kubeconfig"
        _write_kubeconfig(kcm_kubeconfig, server, pki, "controller-manager")
        kcm_log = workdir / "kube-controller-manager.log"
        logs.append(kcm_log)
        procs.append(("kube-controller-manager", _spawn([
            str(kcm), f"--kubeconfig={kcm_kubeconfig}", "--leader-elect=false", "--secure-port=0",
            "--controllers=*", "--use-service-account-credentials=true",
            f"--service-account-private-key-file={pki['sa']}", f"--root-ca-file={pki['ca'][0]}",
            f"--cluster-signing-cert-file={pki['ca'][0]}", f"--cluster-signing-key-file={pki['ca'][1]}",
            "--cluster-name=semipd", f"--flex-volume-plugin-dir={workdir / 'flexvolume'}",
        ], kcm_log)))
        cp = ControlPlane(str(kubeconfig), server, True, f"KUBEBUILDER_ASSETS={assets}", logs)
        core = kubernetes.client.CoreV1Api(cp.api_client())
        _wait("the default ServiceAccount (made by kube-controller-manager)",
              lambda: _exists(core.read_namespaced_service_account, "default", "default"), procs, logs)
        return cp
    return ControlPlane(str(kubeconfig), server, False, f"KUBEBUILDER_ASSETS={assets}", logs)


def _write_pki(d: Path) -> dict:
    """CA, serving and client certificates and the service-account key, as in tests/controlplane/pki.go."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError as e:
        raise ControlPlaneUnavailable(f"KUBEBUILDER_ASSETS needs the Python package 'cryptography' ({e})")
    d.mkdir(parents=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def write_key(name, key):
        path = d / f"{name}.key"
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
        path.chmod(0o600)
        return str(path)

    def write(name, cert, key):
        crt = d / f"{name}.crt"
        crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return str(crt), write_key(name, key)

    def issue(name, subject, ca=None, server=False):
        key = ec.generate_private_key(ec.SECP256R1())
        issuer_name, signer = (ca[0].subject, ca[1]) if ca else (subject, key)
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name).public_key(key.public_key())
             .serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=365)))
        if ca is None:
            b = b.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        else:
            usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
            b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if server:
            b = b.add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.DNSName("kubernetes"), x509.DNSName("kubernetes.default"),
                x509.DNSName("kubernetes.default.svc"), x509.DNSName("kubernetes.default.svc.cluster.local"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("10.96.0.1")),
            ]), critical=False)
        cert = b.sign(signer, hashes.SHA256())
        return cert, key, write(name, cert, key)

    def name(cn, org=None):
        attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
        if org:
            attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
        return x509.Name(attrs)

    ca_cert, ca_key, ca_files = issue("ca", name("semipd-controlplane-ca"))
    ca = (ca_cert, ca_key)
    pki = {"ca": ca_files}
    pki["apiserver"] = issue("apiserver", name("kube-apiserver"), ca, server=True)[2]
    pki["admin"] = issue("admin", name("semipd-admin", "system:masters"), ca)[2]
    pki["controller-manager"] = issue("controller-manager", name("system:kube-controller-manager"), ca)[2]
    pki["sa"] = write_key("service-account", ec.generate_private_key(ec.SECP256R1()))
    return pki


def _write_kubeconfig(path: Path, server: str, pki: dict, user: str) -> None:
    def b64(p):
        return base64.b64encode(Path(p).read_bytes()).decode()

    crt, key = pki[user]
    cfg = {
        "apiVersion": "v1", "kind": "Config", "current-context": "semipd",
        "clusters": [{"name": "semipd", "cluster": {"server": server, "certificate-authority-data": b64(pki["ca"][0])}}],
        "users": [{"name": "semipd", "user": {"client-certificate-data": b64(crt), "client-key-data": b64(key)}}],
        "contexts": [{"name": "semipd", "context": {"cluster": "semipd", "user": "semipd", "namespace": "default"}}],
    }
    path.write_text(yaml.safe_dump(cfg))
    path.chmod(0o600)  # it holds a private key


def _readyz(server: str, pki: dict) -> bool:
    ctx = ssl.create_default_context(cafile=pki["ca"][0])
    ctx.load_cert_chain(*pki["admin"])
    try:
        with urllib.request.urlopen(f"{server}/readyz", context=ctx, timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def _exists(read, *args) -> bool:
    try:
        read(*args)
        return True
    except kubernetes.client.ApiException as e:
        if e.status == 404:
            return False
        raise


# ---- processes ---------------------------------------------------------------------------------------------


def _spawn(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _wait(what: str, check, procs: list, logs: list[Path]):
    """Poll check() until it returns something truthy; a process exiting or the timeout is a clear error."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        result = check()
        if result:
            return result
        for name, p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with code {p.returncode} while waiting for {what}:\n"
                                   + "\n".join(_tail(log) for log in logs))
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {READY_TIMEOUT_S:.0f}s waiting for {what} "
                               "(SEMIPD_CONTROLPLANE_TIMEOUT sets the limit):\n" + "\n".join(_tail(log) for log in logs))
        time.sleep(0.2)


def _stop(procs: list) -> None:
    """SIGTERM in reverse start order (controllers, apiserver, etcd), then SIGKILL whatever hangs."""
    for _, p in reversed(procs):
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=40)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    procs.clear()


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except FileNotFoundError:
        return f"--- {path}: (no log)"
    return f"--- last {len(text)} lines of {path}:\n" + "\n".join(text)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
