"""The SemiPDService CRD. crds/semipdservice.yaml is the one source; operator/semipdservice.yaml is a symlink
to it so an installed package carries it too."""
import time
from pathlib import Path

import yaml

from semipd.operator import names
from semipd.operator.kube import ApiError, Kube

CRD_FILE = Path(__file__).resolve().parent / "semipdservice.yaml"
CRD_NAME = f"{names.PLURAL}.{names.GROUP}"
PEERING_FILE = Path(__file__).resolve().parent / "kopfpeering.yaml"   # kopf's peering CRDs, for --peering


def load() -> dict:
    return yaml.safe_load(CRD_FILE.read_text())


def schema(crd: dict | None = None) -> dict:
    crd = crd or load()
    version = next(v for v in crd["spec"]["versions"] if v["name"] == names.VERSION)
    return version["schema"]["openAPIV3Schema"]


def install(kube: Kube, timeout: float = 60.0) -> dict:
    """Server-side apply the CRD (upgrades too) and wait until the API server serves it."""
    kube.apply(load(), "customresourcedefinitions")
    return established(kube, CRD_NAME, timeout)


def install_peering(kube: Kube, timeout: float = 60.0) -> None:
    """Server-side apply kopf's ClusterKopfPeering and KopfPeering CRDs and wait until both are served."""
    for doc in yaml.safe_load_all(PEERING_FILE.read_text()):
        kube.apply(doc, "customresourcedefinitions")
        established(kube, doc["metadata"]["name"], timeout)


def established(kube: Kube, name: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            crd = kube.get("apiextensions.k8s.io/v1", "customresourcedefinitions", None, name)
        except ApiError:
            crd = {}
        conds = {c["type"]: c["status"] for c in (crd.get("status") or {}).get("conditions") or []}
        if conds.get("Established") == "True" and conds.get("NamesAccepted") == "True":
            return crd
        if time.monotonic() > deadline:
            raise TimeoutError(f"CRD {name} not established after {timeout:g} s: {conds}")
        time.sleep(0.2)
