"""The docs say what the code does. Every `semipd ...` and `python bench/...` command in the user docs parses
with the real command-line parsers, every repository path they name exists, README's `semipd serve` table is
the parser's (every flag, and the defaults it states), docs/operator.md's field table is the CRD's schema
(every field, and the defaults the schema sets), and .ci/run runs README's test command.

The commands that talk to a server or a cluster are run for real elsewhere: tests/engine/test_readme_commands.py
and tests/cluster/test_readme_kubernetes.py."""
from __future__ import annotations

import argparse
import re
import runpy
import sys
from contextlib import contextmanager
from unittest import mock

import pytest
import yaml

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from doc_snippets import REPO, SHELL_LANGS, USER_DOCS, blocks, code_spans, shell_commands, table, words  # noqa: E402

pytestmark = pytest.mark.unit

PATH_PREFIXES = ("crds/", "charts/", "e2e/", "bench/", "docs/", "examples/", "docker/", "tests/", ".ci/",
                 "runtime/", "operator/", "policy/", "kernels/")


def user_commands() -> list[tuple[str, list[str]]]:
    """(where, words) of every simple command in the shell blocks of the user docs."""
    found = []
    for path in USER_DOCS:
        for block in blocks(path, SHELL_LANGS):
            for command in shell_commands(block):
                for simple in words(command):
                    found.append((f"{path}:{block.line}", simple))
    return found


class _Parsed(BaseException):
    """Raised once a parser accepted its arguments, so that nothing the command would then do runs (a
    BaseException, so that no `except Exception` in a command swallows it)."""


@contextmanager
def stop_after_parsing():
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        result = original(self, args, namespace)
        raise _Parsed(result)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_then_stop):
        yield


def parse_only(argv: list[str]) -> None:
    """Parse a `semipd ...` or `python SCRIPT ...` command as its entry point would; fail on a usage error."""
    with stop_after_parsing():
        try:
            if argv[0] == "semipd":
                from semipd.runtime.cli import main
                main(argv[1:])
            else:
                script = argv[1]
                # as `python SCRIPT` runs it: argv, and the script's folder first on the path
                with mock.patch.object(sys, "argv", [script, *argv[2:]]), \
                        mock.patch.object(sys, "path", [str((REPO / script).parent), *sys.path]):
                    runpy.run_path(str(REPO / script), run_name="__main__")
        except _Parsed:
            return
        except SystemExit as exc:
            pytest.fail(f"{' '.join(argv)!r} is refused by its parser (exit {exc.code})")
    pytest.fail(f"{' '.join(argv)!r} never reached its argument parser")


def semipd_and_script_commands() -> list[tuple[str, list[str]]]:
    wanted = []
    for where, argv in user_commands():
        if argv[0] == "semipd" and len(argv) > 1 and argv[1] != "operator":
            wanted.append((where, argv))
        elif argv[0] in ("python", "python3") and len(argv) > 1 and argv[1].startswith("bench/") \
                and argv[1].endswith(".py") and "gpu/" not in argv[1] and "--help" not in argv:
            wanted.append((where, argv))
    return wanted


@pytest.mark.parametrize("where,argv", semipd_and_script_commands(),
                         ids=[f"{where} {' '.join(argv[:2])}" for where, argv in semipd_and_script_commands()])
def test_documented_commands_parse(where, argv, capsys):
    parse_only(argv)


def test_the_commands_found_cover_every_subcommand():
    """A reader of the docs sees each subcommand at least once (else the parse test above proves little)."""
    used = {argv[1] for _, argv in semipd_and_script_commands() if argv[0] == "semipd"}
    assert {"serve", "bench", "simulate", "tiny-model"} <= used


def test_operator_commands_parse():
    """`semipd operator ...` as the docs write it (its parser is separate: kopf takes over after it)."""
    from semipd.operator.main import parse_args
    commands = [argv for _, argv in user_commands() if argv[:2] == ["semipd", "operator"]]
    assert commands, "the docs show no `semipd operator` command"
    for argv in commands:
        parse_args(argv[2:])


def named_paths() -> set[tuple[str, str]]:
    """(where, path) for every repository path named in a shell block or a relative Markdown link."""
    found = set()
    for where, argv in user_commands():
        for word in argv:
            for candidate in re.split(r"[=:]", word):
                if candidate.startswith(PATH_PREFIXES) and not any(c in candidate for c in "*$<>{}"):
                    found.add((where, candidate))
    for path in USER_DOCS:
        text = (REPO / path).read_text()
        base = (REPO / path).parent
        for link in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" not in link and not link.startswith("mailto:"):
                found.add((path, str((base / link).resolve().relative_to(REPO))))
    return found


def test_every_named_path_exists():
    missing = sorted(f"{where}: {path}" for where, path in named_paths() if not (REPO / path).exists())
    assert not missing, "paths the docs name that do not exist:\n" + "\n".join(missing)


def test_ci_runs_the_readme_test_command():
    readme = blocks("README.md", {"bash"})[0]
    test_command = next(c for c in shell_commands(readme) if "pytest" in c).split("#")[0].strip()
    ci = (REPO / ".ci/run").read_text().splitlines()
    assert test_command in [line.strip() for line in ci if not line.lstrip().startswith("#")]


# ---- `semipd serve` flags: README's table against the parser

def serve_parser() -> argparse.ArgumentParser:
    from semipd.runtime.cli import _serve_parser
    return _serve_parser(argparse.ArgumentParser().add_subparsers())


def serve_options() -> dict[str, argparse.Action]:
    return {opt: action for action in serve_parser()._actions for opt in action.option_strings
            if opt not in ("-h", "--help")}


def flag_rows() -> list[tuple[list[str], str]]:
    rows = table("README.md", "Configuration (`semipd serve --help`)")
    return [([s for s in code_spans(row[0]) if s.startswith("--")], row[1]) for row in rows]


def test_serve_table_names_every_flag_and_only_real_ones():
    options = serve_options()
    documented = {flag for flags, _ in flag_rows() for flag in flags}
    assert documented - set(options) == set(), "README documents flags `semipd serve` does not have"
    undocumented = {opt for opt in options if opt not in documented
                    and opt.replace("--no-", "--", 1) not in documented}
    assert undocumented == set(), "flags of `semipd serve` missing from README's Configuration table"


def literal_defaults(cell: str) -> list[str] | None:
    """'0.1 / 0.9' -> ['0.1', '0.9']; None when the cell is prose (e.g. "model's, or what the KV pool holds")."""
    parts = [p.strip().strip("`") for p in cell.split(" / ")]
    return parts if all(re.fullmatch(r"[\w.\-]+", p) for p in parts) else None


def test_serve_table_defaults_are_the_parsers():
    options, checked = serve_options(), 0
    for flags, cell in flag_rows():
        values = literal_defaults(cell)
        if values is None or len(values) != len(flags):
            continue
        for flag, value in zip(flags, values):
            default = options[flag].default
            if isinstance(default, bool) or default is None:
                continue
            assert str(default) == value or (isinstance(default, float) and float(value) == default), \
                f"README says {flag} defaults to {value}; the parser says {default}"
            checked += 1
    assert checked >= 15, "too few literal defaults were compared: has the table's layout changed?"


# ---- SemiPDService fields: docs/operator.md's table against the CRD

def spec_schema() -> dict:
    crd = yaml.safe_load((REPO / "crds/semipdservice.yaml").read_text())
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    return version["schema"]["openAPIV3Schema"]["properties"]["spec"]


def field_rows() -> list[tuple[list[str], str]]:
    """Each row's field paths (`partition.min`, `.max` -> partition.min, partition.max) and its default cell."""
    rows = []
    for row in table("docs/operator.md", "Spec"):
        paths, parent = [], ""
        for span in code_spans(row[0]):
            if span.startswith("."):
                paths.append(parent + span[1:])
            else:
                paths.append(span)
                parent = span.rsplit(".", 1)[0] + "." if "." in span else ""
        rows.append((paths, row[1]))
    return rows


def schema_at(schema: dict, path: str) -> dict | None:
    node = schema
    for part in path.split("."):
        node = (node.get("properties") or {}).get(part)
        if node is None:
            return None
    return node


def leaves(schema: dict, prefix: str = "") -> dict[str, dict]:
    """Every field a user sets: objects with their own properties are opened, arrays and maps are fields."""
    found = {}
    for name, node in (schema.get("properties") or {}).items():
        path = prefix + name
        if node.get("type") == "object" and node.get("properties"):
            found.update(leaves(node, path + "."))
        else:
            found[path] = node
    return found


def test_operator_table_names_only_fields_of_the_crd():
    schema = spec_schema()
    unknown = [p for paths, _ in field_rows() for p in paths if schema_at(schema, p) is None]
    assert unknown == [], "docs/operator.md documents fields the CRD does not have"


def test_every_crd_field_is_in_the_operator_table():
    documented = {p for paths, _ in field_rows() for p in paths}

    def covered(path: str) -> bool:
        parts = path.split(".")
        return any(".".join(parts[:i]) in documented for i in range(1, len(parts) + 1))

    missing = sorted(p for p in leaves(spec_schema()) if not covered(p))
    assert missing == [], "CRD fields missing from docs/operator.md's Spec table"


def test_every_crd_default_is_the_documented_one():
    schema, checked = spec_schema(), 0
    for paths, cell in field_rows():
        values = [v.strip().strip("`") for v in cell.split(",")]
        for i, path in enumerate(paths):
            node = schema_at(schema, path)
            if "default" not in node:
                continue
            value = values[i] if len(values) == len(paths) else values[0]
            default = node["default"]
            same = (str(default) == value or (isinstance(default, (int, float)) and not isinstance(default, bool)
                                              and re.fullmatch(r"[\d.]+", value) and float(value) == default))
            assert same, f"docs/operator.md says {path} defaults to {value!r}; the CRD's default is {default!r}"
            checked += 1
    schema_defaults = [p for p, node in leaves(schema).items() if "default" in node]
    assert checked == len(schema_defaults), \
        f"CRD defaults not documented as such: {sorted(set(schema_defaults) - {p for ps, _ in field_rows() for p in ps})}"


# ---- image names: one name per image everywhere a user copies one from

IMAGES = {"ghcr.io/semipd/semipd-operator", "ghcr.io/semipd/semipd-cuda", "ghcr.io/semipd/semipd-cpu"}


def test_image_names_are_the_three_built_ones():
    places = USER_DOCS + [str(p.relative_to(REPO)) for p in (REPO / "examples").glob("*.yaml")] \
        + [str(p.relative_to(REPO)) for p in (REPO / "charts/semipd").rglob("*") if p.is_file()]
    seen = {}
    for place in places:
        for name in re.findall(r"ghcr\.io/semipd/[\w.-]+", (REPO / place).read_text()):
            seen.setdefault(name, place)
    assert set(seen) <= IMAGES, f"image names other than the docker/ builds': {seen}"
    values = yaml.safe_load((REPO / "charts/semipd/values.yaml").read_text())
    assert values["image"]["repository"] == "ghcr.io/semipd/semipd-operator"
