"""The README and docs/ are tested: every Python block runs as pasted, or says what it is.

A ```` ```python ```` block is one of:

* **runnable** (no marker): written to a file of its own and run with Python; it must exit 0;
* ``<!-- file: PATH -->`` on the line before it: one file of a small project the document
  describes (a quick start's ``app.py``, a Django project's ``mysite/…``); the document's
  files are written together into one directory, and a ``<!-- chat-app: MODULE:ATTR -->``
  line anywhere in the document names an app there that ``tests/_docs_driver.py`` imports and
  drives (a fresh turn, its replay, 401 without credentials, the turn routes…);
* ``<!-- fragment: examples/NAME.py -->`` on the line before it: an excerpt of a complete
  file under ``examples/`` (which the end-to-end tests run): each of its non-blank lines must
  be in that file, in order.

Anything that is neither is not tagged ``python`` (``text``, ``pycon``, ``sh``…).
"""

from __future__ import annotations

import py_compile
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DRIVER = Path(__file__).resolve().parent / "_docs_driver.py"
FENCE = re.compile(r"^\s*```+\s*([\w+-]*)")
MARKER = re.compile(r"^\s*<!--\s*(file|fragment|chat-app):\s*(\S+)\s*-->\s*$")
RUN_TIMEOUT_S = 30


@dataclass(frozen=True)
class Block:
    document: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    marker: tuple[str, str] | None  # (kind, argument) of the line before the fence

    @property
    def where(self) -> str:
        return f"{self.document.relative_to(ROOT)}:{self.line}"


def parse(document: Path) -> tuple[list[Block], list[str]]:
    """The fenced blocks of ``document`` and its chat-app targets."""
    lines = document.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    apps: list[str] = []
    i = 0
    while i < len(lines):
        marker = MARKER.match(lines[i])
        if marker and marker.group(1) == "chat-app":
            apps.append(marker.group(2))
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        start = i
        i += 1
        body: list[str] = []
        while i < len(lines) and not FENCE.match(lines[i]):
            body.append(lines[i])
            i += 1
        before = MARKER.match(lines[start - 1]) if start else None
        blocks.append(
            Block(
                document,
                start + 1,
                fence.group(1).lower(),
                "\n".join(body) + "\n",
                (before.group(1), before.group(2)) if before else None,
            )
        )
        i += 1  # the closing fence
    return blocks, apps


PARSED = {document: parse(document) for document in DOCUMENTS}
PYTHON = [b for blocks, _ in PARSED.values() for b in blocks if b.lang in ("python", "py")]


def _ids(blocks: list[Block]) -> list[str]:
    return [block.where for block in blocks]


RUNNABLE = [b for b in PYTHON if b.marker is None]
FRAGMENTS = [b for b in PYTHON if b.marker is not None and b.marker[0] == "fragment"]
PROJECTS = [
    (document, apps) for document, (blocks, apps) in PARSED.items()
    if any(b.marker is not None and b.marker[0] == "file" for b in blocks)
]  # fmt: skip


def run_python(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )


def test_every_block_marker_is_on_a_python_block() -> None:
    for blocks, _ in PARSED.values():
        for block in blocks:
            if block.marker is not None and block.marker[0] in ("file", "fragment"):
                assert block.lang in ("python", "py"), f"{block.where}: marker on a non-Python"


def test_the_readme_quick_starts_are_driven() -> None:
    _, apps = PARSED[ROOT / "README.md"]
    assert sorted(apps) == ["main:app", "mysite.asgi:application", "quickstart:app"]


@pytest.mark.parametrize("block", RUNNABLE, ids=_ids(RUNNABLE))
def test_a_runnable_block_runs_as_pasted(block: Block, tmp_path: Path) -> None:
    script = tmp_path / "snippet.py"
    script.write_text(block.code, encoding="utf-8")
    result = run_python([str(script)], tmp_path)
    assert result.returncode == 0, f"{block.where} failed:\n{result.stdout}\n{result.stderr}"


def test_every_fragment_is_in_its_file() -> None:
    # One test over all of them (not parametrised): there may be none, and an empty
    # parametrisation would be a skip in a green run.
    for block in FRAGMENTS:
        assert block.marker is not None
        path = ROOT / block.marker[1]
        assert path.is_file(), f"{block.where}: no such file {block.marker[1]}"
        whole = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        position = 0
        for wanted in (line.strip() for line in block.code.splitlines()):
            if not wanted:
                continue
            try:
                position = whole.index(wanted, position) + 1
            except ValueError:
                pytest.fail(f"{block.where}: {wanted!r} is not in {block.marker[1]} (in order)")


@pytest.mark.parametrize(
    ("document", "apps"), PROJECTS, ids=[str(d.relative_to(ROOT)) for d, _ in PROJECTS]
)
def test_a_documents_files_make_apps_that_work(
    document: Path, apps: list[str], tmp_path: Path
) -> None:
    blocks, _ = PARSED[document]
    for block in blocks:
        if block.marker is None or block.marker[0] != "file":
            continue
        path = tmp_path / block.marker[1]
        assert not path.exists(), f"{block.where}: {block.marker[1]} is written twice"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(block.code, encoding="utf-8")
        py_compile.compile(str(path), doraise=True)
    for app in apps:
        result = run_python([str(DRIVER), app], tmp_path)
        assert result.returncode == 0, f"{document.name} {app}:\n{result.stdout}\n{result.stderr}"


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation gone, spaces as hyphens."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors_of(document: Path) -> set[str]:
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", document.read_text(encoding="utf-8"), re.M)
    return {github_anchor(h) for h in headings}


@pytest.mark.parametrize("document", DOCUMENTS, ids=[str(d.relative_to(ROOT)) for d in DOCUMENTS])
def test_every_relative_link_resolves(document: Path) -> None:
    text = document.read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # links in code blocks are code
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:…
        path_part, _, anchor = target.partition("#")
        path = (document.parent / path_part).resolve() if path_part else document
        assert path.exists(), f"{document.name}: link to missing {target}"
        assert ROOT in path.parents or path == ROOT, f"{document.name}: {target} leaves the repo"
        if anchor and path.suffix == ".md":
            assert anchor in anchors_of(path), f"{document.name}: no #{anchor} in {path.name}"
