"""The names the operator, the engine and the CRD agree on. Changing one of these is an API change."""

GROUP = "semipd.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "SemiPDService"
PLURAL = "semipdservices"

FIELD_MANAGER = "semipd-operator"
FINALIZER = f"{GROUP}/finalizer"

# Labels on every child; SERVICE_LABEL alone is the pods' selector, so user labels can never change it.
SERVICE_LABEL = f"{GROUP}/service"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "semipd-operator"

# Per-pod annotation the engine reads through the downward-API volume (and the operator writes).
SPLIT_ANNOTATION = f"{GROUP}/sm-partition"
# On the Deployment: hash of the pod template, which by construction holds neither replicas nor the split.
TEMPLATE_HASH_ANNOTATION = f"{GROUP}/pod-template-hash"

ENGINE_CONTAINER = "engine"
MODEL_DIR = "/models"
PODINFO_DIR = "/etc/semipd/podinfo"
ADMIN_DIR = "/etc/semipd/admin"
PARTITION_FILE = f"{PODINFO_DIR}/sm-partition"
ADMIN_TOKEN_FILE = f"{ADMIN_DIR}/token"
ADMIN_TOKEN_KEY = "token"
# Mount paths of the engine container that a podTemplate cannot take over.
RESERVED_PATHS = (PODINFO_DIR, ADMIN_DIR, MODEL_DIR)

# The split the engine boots with before it reads the partition file. It is a constant on purpose: were it the
# desired split, a split change would change the pod template and roll every pod. The operator annotates new
# pods within moments of their creation, so the engine normally finds the desired split in the file at start.
BOOT_SPLIT = 0.5

# Conditions and their reasons (machine-readable; documented in docs/operator.md).
READY = "Ready"
PROGRESSING = "Progressing"
RECONCILING = "Reconciling"   # kstatus: abnormal-true, True while work towards the spec is under way
STALLED = "Stalled"           # kstatus: True when it cannot get there without a change by someone
METRICS_AVAILABLE = "MetricsAvailable"
SLO_MET = "SLOMet"


def admin_secret_name(service: str) -> str:
    return f"{service}-admin-token"


def selector(service: str) -> dict[str, str]:
    return {SERVICE_LABEL: service}


def selector_string(service: str) -> str:
    return f"{SERVICE_LABEL}={service}"


def child_labels(service: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "semipd",
        "app.kubernetes.io/instance": service,
        MANAGED_BY_LABEL: MANAGED_BY,
        SERVICE_LABEL: service,
    }
