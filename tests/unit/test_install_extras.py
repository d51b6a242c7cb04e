"""The operator installs without the engine stack: pyproject's base dependencies cover what operator/ and policy/
import, the engine-only packages sit in the `engine` extra, and `semipd operator` (module and CLI path) runs in a
process that refuses to import any engine package."""
import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# Packages only the engine (runtime/, kernels/, bench/) needs. pydantic is not here: the kubernetes client imports it.
ENGINE_ONLY = ["torch", "triton", "transformers", "fastapi", "starlette", "uvicorn", "safetensors", "tokenizers",
               "xgrammar", "huggingface_hub", "numpy", "matplotlib", "tqdm", "jinja2"]

# import name -> distribution name, where they differ
DIST = {"yaml": "pyyaml", "prometheus_client": "prometheus-client", "huggingface_hub": "huggingface_hub"}


def _dist_names(requirements: list[str]) -> set[str]:
    out = set()
    for r in requirements:
        name = r
        for sep in "<>=!~[; ":
            name = name.split(sep)[0]
        out.add(name.strip().lower().replace("_", "-"))
    return out


def _third_party_imports(paths: list[Path]) -> set[str]:
    found = set()
    for f in paths:
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for n in names:
                top = n.split(".")[0]
                if top not in sys.stdlib_module_names and top != "semipd":
                    found.add(top)
    return found


def _as_dist(module: str) -> str:
    return DIST.get(module, module).lower().replace("_", "-")


def test_base_dependencies_cover_the_operator_and_policy_imports():
    base = _dist_names(PYPROJECT["project"]["dependencies"])
    files = [*(ROOT / "operator").rglob("*.py"), *(ROOT / "policy").rglob("*.py"),
             ROOT / "runtime" / "cli.py", ROOT / "runtime" / "config.py"]
    missing = {m for m in _third_party_imports(files) if _as_dist(m) not in base}
    assert not missing, f"operator/policy import packages that are not base dependencies: {sorted(missing)}"


def test_engine_packages_are_not_base_dependencies_but_the_engine_extra():
    base = _dist_names(PYPROJECT["project"]["dependencies"])
    extras = PYPROJECT["project"]["optional-dependencies"]
    engine = _dist_names(extras["engine"])
    assert {"test", "gpu", "engine"} <= set(extras)
    for pkg in ["torch", "transformers", "safetensors", "tokenizers", "fastapi", "uvicorn", "pydantic", "xgrammar",
                "numpy", "jinja2", "huggingface-hub", "tqdm", "matplotlib"]:
        assert pkg not in base, pkg
        assert pkg in engine, pkg
    # every third-party import of the engine side is a base dependency or in the engine extra (triton ships with
    # torch's CUDA wheels, cuda-python is the gpu extra)
    files = [*(ROOT / "runtime").rglob("*.py"), *(ROOT / "kernels").rglob("*.py"),
             *(ROOT / "bench" / "loadgen").rglob("*.py"), *(ROOT / "bench" / "sim").rglob("*.py")]
    known = base | engine | _dist_names(extras["gpu"]) | {"triton", "starlette", "cuda"}
    missing = {m for m in _third_party_imports(files) if _as_dist(m) not in known}
    assert not missing, f"engine code imports packages no extra names: {sorted(missing)}"


GUARD = textwrap.dedent("""
    import sys
    BLOCKED = set(sys.argv[1].split(","))

    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"engine package {name!r} imported by the operator path")
            return None

    for m in list(sys.modules):
        assert m.split(".")[0] not in BLOCKED, m
    sys.meta_path.insert(0, Refuse())
""")


def _run_guarded(body: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", GUARD + textwrap.dedent(body), ",".join(ENGINE_ONLY)],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ), cwd=ROOT)


def test_the_guard_refuses_engine_packages():
    r = _run_guarded("""
        try:
            import torch
        except ImportError as e:
            print("refused:", e)
        else:
            raise SystemExit("torch was imported")
    """)
    assert r.returncode == 0 and "refused" in r.stdout, r.stdout + r.stderr


def test_operator_imports_without_engine_packages():
    r = _run_guarded("""
        import importlib, pkgutil
        import semipd.operator, semipd.policy
        import semipd.operator.main
        for pkg in (semipd.operator, semipd.policy):
            for m in pkgutil.iter_modules(pkg.__path__):
                importlib.import_module(f"{pkg.__name__}.{m.name}")
        print("ok")
    """)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr


def test_semipd_operator_help_without_engine_packages():
    r = _run_guarded("""
        from semipd.runtime.cli import main
        try:
            main(["operator", "--help"])
        except SystemExit as e:
            assert e.code in (0, None), e.code
        else:
            raise SystemExit("--help did not exit")
    """)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "semipd operator" in r.stdout and "--namespace" in r.stdout, r.stdout


def test_semipd_serve_without_the_engine_says_what_to_install():
    r = _run_guarded("""
        from semipd.runtime.cli import main
        raise SystemExit(main(["serve"]))
    """)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "pip install 'semipd[engine]'" in r.stderr and "Traceback" not in r.stderr, r.stderr
