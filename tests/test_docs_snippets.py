"""Run every fenced ```python block in README.md and docs/*.md that follows a line ``<!-- test -->``."""

import re
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
_BLOCK = re.compile(r"^<!-- test -->[ \t]*\n(?:[ \t]*\n)*```python[^\n]*\n(.*?)^```", re.M | re.S)


def snippets() -> list:
    out = []
    for md in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
        for i, match in enumerate(_BLOCK.finditer(md.read_text()), start=1):
            out.append(pytest.param(match.group(1), id=f"{md.name}:{i}"))
    return out


def test_snippet_extraction_finds_marked_blocks_only():
    text = "x\n<!-- test -->\n\n```python\nprint(1)\n```\n```python\nprint(2)\n```\n"
    assert [m.group(1) for m in _BLOCK.finditer(text)] == ["print(1)\n"]
    assert any("snapshots.md" in p.id for p in snippets())


@pytest.mark.parametrize("code", snippets())
def test_docs_snippet_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    script = tmp_path / "snippet.py"
    script.write_text(code)
    runpy.run_path(str(script), run_name="__main__")
