"""Docs commands run as written: every ``bash`` block marked ``<!-- runnable -->`` in ``docs/*.md`` is executed
line by line from a folder laid out like the repository root after ``make demo``, and every ``medfoundry`` line of
every ``bash`` block in the docs and the README parses with the real command line (a renamed option or command in
a doc fails here, not on a user's machine).

The marker says: this block runs on a CPU machine after ``make demo``, as written (no GPU, no cluster, no data of
your own). Blocks that need those stay unmarked and are only parsed. Lines identical to the README's Quick-start
lines are not run twice: ``test_readme_quickstart.py`` runs those.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from test_readme_quickstart import quickstart_lines, write_demo_layout

from medfoundry_cli.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
MARKER = "<!-- runnable -->"
DOCS = sorted((ROOT / "docs").glob("*.md"))


def _commands(body: str) -> list[str]:
    """A block's commands: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", body)
    lines = []
    for raw in joined.splitlines():
        line = re.sub(r"(^|\s+)#.*$", "", raw).strip()
        if line:
            lines.append(line)
    return lines


def bash_blocks(path: Path) -> list[tuple[bool, list[str]]]:
    """``(marked runnable, commands)`` for each fenced ``bash`` block of a Markdown file."""
    text = path.read_text()
    out = []
    for m in re.finditer(r"(?m)^```bash\n(.*?)^```", text, re.S):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        out.append((before == MARKER, _commands(m.group(1))))
    return out


def runnable_lines() -> list[tuple[str, str]]:
    """``(doc name, command)`` of every line in a block marked runnable, in document order."""
    return [(p.name, line) for p in DOCS for marked, lines in bash_blocks(p) if marked for line in lines]


def medfoundry_lines() -> list[tuple[str, str]]:
    """``(doc name, words after medfoundry)`` of every ``medfoundry ...`` line in any bash block."""
    found = []
    for p in [ROOT / "README.md", *DOCS]:
        for _, lines in bash_blocks(p):
            found += [(p.name, line) for line in lines if line.startswith("medfoundry ")]
    return found


def test_the_docs_mark_runnable_blocks() -> None:
    """The convention is in use (a marker lost in an edit would silently stop these commands being run)."""
    docs = {doc for doc, _ in runnable_lines()}
    assert {"performance.md", "weights.md", "cluster.md"} <= docs, docs


@pytest.mark.parametrize("doc,line", medfoundry_lines(), ids=lambda v: v[:60])
def test_every_docs_medfoundry_line_parses(doc: str, line: str) -> None:
    """Options and commands exist as the doc spells them (``[--flag]`` is the docs' notation for optional)."""
    parser, _ = build_parser()
    words = [w for w in shlex.split(re.sub(r"\[[^\]]*\]", "", line))[1:]]
    try:
        parser.parse_args(words)
    except SystemExit as stop:
        if stop.code not in (0, None):  # --version / --help exit 0
            pytest.fail(f"{doc}: `{line}` does not parse with today's command line")


@pytest.mark.slow
def test_runnable_docs_blocks_run_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture) -> None:
    """``medfoundry`` lines go to the command's ``main`` in this process; ``python`` lines run as a subprocess of
    this interpreter (the venv's); both from the stand-in root with ``recipes/`` and ``benchmarks/`` linked."""
    write_demo_layout(tmp_path / ".cache", [])
    for name in ("recipes", "benchmarks"):
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PWD", str(tmp_path))
    done_by_readme = set(quickstart_lines())
    ran = []
    for doc, line in runnable_lines():
        if line in done_by_readme:
            continue
        words = shlex.split(os.path.expandvars(line))
        if words[0] == "medfoundry":
            code = main(words[1:])
            out = capsys.readouterr()
            detail = out.err[-3000:]
        elif words[0] == "python":
            proc = subprocess.run([sys.executable, *words[1:]], capture_output=True, text=True, timeout=600)
            code, detail = proc.returncode, proc.stderr[-3000:]
        else:
            pytest.fail(f"{doc}: `{line}` is marked runnable but is neither a medfoundry nor a python command")
        assert code in (0, None), f"{doc}: `{line}` failed (exit {code})\n{detail}"
        ran.append(line)
    assert len(ran) >= 5, ran
    assert (tmp_path / "runs" / "tiny_dino_cpu" / "config.yaml").is_file()
    assert (tmp_path / "runs" / "l14" / "launch" / "submit.sbatch").is_file()
