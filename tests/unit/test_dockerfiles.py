"""A lint of docker/*.Dockerfile without Docker (hadolint's main rules that matter here): every FROM pinned to a tag
or digest and never `latest`, a non-root USER in the final stage, no `ADD` of a URL, no sudo, pip without its
cache, and every COPY source present in the repository."""
import re
import shlex
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):          # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    assert not buf, f"{path.name}: dangling line continuation"
    return out


def stages(ins: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    out = []
    for word, rest in ins:
        if word == "FROM":
            out.append([])
        if out:
            out[-1].append((word, rest))
    return out


def resolve(image: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), image)


def test_the_three_images_exist():
    names = {p.name for p in DOCKERFILES}
    assert {"engine-cuda.Dockerfile", "engine-cpu.Dockerfile", "operator.Dockerfile"} <= names


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_lint(path):
    ins = instructions(path)
    assert ins, path
    args: dict[str, str] = {}
    stage_names: set[str] = set()
    for word, rest in ins:
        if word == "ARG" and "=" in rest:
            k, _, v = rest.partition("=")
            args.setdefault(k.strip(), v.strip().strip('"'))
        elif word == "FROM":
            parts = rest.split()
            image = resolve(parts[0], args)
            if image in stage_names:
                continue
            assert "$" not in image, f"{path.name}: FROM {parts[0]} has no pinned default"
            assert "@sha256:" in image or ":" in image.rsplit("/", 1)[-1], f"{path.name}: FROM {image} is not pinned"
            tag = image.split("@")[0].rsplit("/", 1)[-1].partition(":")[2]
            assert tag and tag != "latest", f"{path.name}: FROM {image} uses latest or no tag"
            if len(parts) == 3 and parts[1].upper() == "AS":
                stage_names.add(parts[2])
        elif word == "ADD":
            assert not re.search(r"(^|\s)(https?|ftp)://", rest), f"{path.name}: ADD of a URL: {rest}"
        elif word == "RUN":
            assert not re.search(r"(^|[\s;&|])sudo\s", rest), f"{path.name}: sudo in RUN: {rest}"
            for cmd in re.split(r"&&|;|\|\|", rest):
                if re.search(r"\bpip3?\s+install\b", cmd):
                    assert "--no-cache-dir" in cmd, f"{path.name}: pip install without --no-cache-dir: {cmd}"
        for secret in ("PASSWORD", "SECRET", "TOKEN=", "API_KEY", "AWS_"):
            if word in ("ENV", "ARG"):
                assert secret not in rest.upper(), f"{path.name}: a secret-looking {word}: {rest}"

    final = stages(ins)[-1]
    users = [rest for word, rest in final if word == "USER"]
    assert users, f"{path.name}: the final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"{path.name}: the final stage runs as root"
    assert any(w in ("HEALTHCHECK", "EXPOSE") for w, _ in final), f"{path.name}: no HEALTHCHECK"
    assert any(w in ("ENTRYPOINT", "CMD") for w, _ in final), f"{path.name}: no ENTRYPOINT/CMD"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_copied_files_exist(path):
    ignored = (ROOT / ".dockerignore").read_text().split() if (ROOT / ".dockerignore").exists() else []
    for word, rest in instructions(path):
        if word not in ("COPY", "ADD"):
            continue
        parts = shlex.split(rest)
        if any(p.startswith("--from=") for p in parts):
            continue
        sources = [p for p in parts if not p.startswith("--")][:-1]
        assert sources, f"{path.name}: {word} {rest}"
        for src in sources:
            assert (ROOT / src).exists(), f"{path.name}: {word} {src}: not in the repository"
            assert src.rstrip("/") not in ignored, f"{path.name}: {src} is excluded by .dockerignore"


def test_operator_image_installs_the_base_only():
    ins = instructions(ROOT / "docker" / "operator.Dockerfile")
    pips = [rest for word, rest in ins if word == "RUN" and "pip install" in rest]
    assert pips and all("[" not in p and "torch" not in p for p in pips), pips
    base = [r for w, r in ins if w == "ARG" and r.startswith("PYTHON_IMAGE=")]
    assert base and re.fullmatch(r"PYTHON_IMAGE=python:3\.12[.\d]*-slim-\w+", base[0]), base
