"""Reading the code blocks and tables of the project's Markdown, for the tests that hold the docs to the code.

A shell block is read as a user pastes it: backslash continuations joined, comments dropped, heredocs kept
with the line that opens them."""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
USER_DOCS = ["README.md", "docs/operator.md", "docs/bench.md", "docs/simulate.md", "docs/policy.md", "docs/gpu.md",
             "e2e/README.md", "examples/README.md", "charts/semipd/README.md"]
SHELL_LANGS = {"bash", "sh", "shell", "console"}


@dataclass
class Block:
    path: str
    lang: str
    text: str
    line: int     # where the block starts in its file


def blocks(path: str, langs: set[str] | None = None) -> list[Block]:
    """The fenced code blocks of one Markdown file, optionally only those of the given languages."""
    found, lines = [], (REPO / path).read_text().splitlines()
    i = 0
    while i < len(lines):
        opening = re.match(r"^```(\w*)\s*$", lines[i])
        if not opening:
            i += 1
            continue
        start, body = i + 1, []
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        i += 1
        if langs is None or opening.group(1) in langs:
            found.append(Block(path, opening.group(1), "\n".join(body) + "\n", start + 1))
    return found


def shell_commands(block: Block | str) -> list[str]:
    """One string per command as the shell reads it: continuations joined, heredoc bodies dropped."""
    commands, pending, heredoc_end = [], "", None
    for raw in (block if isinstance(block, str) else block.text).splitlines():
        if heredoc_end is not None:
            if raw.strip() == heredoc_end:
                heredoc_end = None
            continue
        line = pending + raw
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        opener = re.search(r"<<-?\s*'?\"?(\w+)'?\"?", line)
        if opener:
            heredoc_end = opener.group(1)
        if line.strip() and not line.lstrip().startswith("#"):
            commands.append(line.strip())
    return commands


def heredocs(block: Block | str) -> list[str]:
    """The bodies of the heredocs in a shell block (what `kubectl apply -f - <<'EOF'` sends)."""
    bodies, body, end = [], [], None
    for raw in (block if isinstance(block, str) else block.text).splitlines():
        if end is not None:
            if raw.strip() == end:
                bodies.append("\n".join(body) + "\n")
                body, end = [], None
            else:
                body.append(raw)
            continue
        opener = re.search(r"<<-?\s*'?\"?(\w+)'?\"?", raw)
        if opener:
            end = opener.group(1)
    return bodies


def words(command: str) -> list[list[str]]:
    """A command line's simple commands (split at &&, ||, ;, |), each as its words; comments dropped."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    parts, current = [], []
    for token in lexer:
        if token and set(token) <= set(";&|"):
            if current:
                parts.append(current)
            current = []
        else:
            current.append(token)
    if current:
        parts.append(current)
    return parts


def table(path: str, heading: str) -> list[list[str]]:
    """The rows of the first table under `heading` (a Markdown heading line's text), header and rule dropped."""
    lines = (REPO / path).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip("#").strip() == heading and line.startswith("#"))
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("#"):
            break
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif rows:
            break
    return [row for row in rows[1:] if not set("".join(row)) <= set("-: ")]


def code_spans(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)
