"""The README and the documentation site (`docs/`, built by MkDocs): every Python block runs as
written, every benchmark number they quote is in its results file, the findings catalogue lists
every kind the code can emit, and the site builds in strict mode."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gradwatch.detect.findings import FINDING_KINDS

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCKS = [
    (page, index, block)
    for page in PAGES
    for index, block in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S))
]


def test_the_readme_and_the_site_have_examples():
    assert {page.name for page, _, _ in BLOCKS} >= {"README.md", "getting-started.md"}


@pytest.mark.parametrize(
    ("page", "index", "block"),
    BLOCKS,
    ids=[f"{p.relative_to(ROOT)}[{i}]" for p, i, _ in BLOCKS],
)
def test_example_runs(page, index, block, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(block, f"{page.relative_to(ROOT)}[python block {index}]", "exec"), {})
    assert capsys.readouterr().out


RESULTS = ROOT / "benchmarks" / "results"
# A whole decimal number (not part of 2.13.0 or 1.0412); one marked as computed from quoted ones
# (≈1.13, or a share like 6.3%) is not itself a quote.
NUMBER = r"(?<![\d.≈]){}(?!\d|\.\d|%)"


def quoting_blocks() -> list[tuple[Path, list[str], str]]:
    """(page, results files, text) of each paragraph that names `results/<file>.md`, and of a
    table right after such a paragraph (it quotes the same files)."""
    found = []
    for page in PAGES:
        named: list[str] = []
        for block in page.read_text().split("\n\n"):
            files = re.findall(r"results/([\w.-]+\.md)", block)
            if files:
                named = files
                found.append((page, files, block))
            elif named and block.lstrip().startswith("|"):
                found.append((page, named, block))
            else:
                named = []
    return found


def test_quoted_benchmark_numbers_are_in_the_results_files():
    """Every decimal number in a paragraph (or its table) that names a results file is in that
    file: a number the code no longer gives cannot stay in the documentation."""
    blocks = quoting_blocks()
    assert blocks
    missing = []
    for page, files, block in blocks:
        assert all((RESULTS / f).is_file() for f in files), (page, files)
        text = "\n".join((RESULTS / f).read_text() for f in files)
        for number in re.findall(NUMBER.format(r"\d+\.\d+"), block):
            if not re.search(NUMBER.format(re.escape(number)), text):
                missing.append(f"{page.name}: {number} (quoted with {', '.join(files)})")
    assert not missing, "numbers not in the results files: " + "; ".join(missing)


def emitted_kinds() -> set[str]:
    """The `kind=` of every `Finding(...)` made in gradwatch's source (one rebuilt from the run
    store, with the kind passed by position, makes no new kind)."""
    kinds = set()
    for path in (ROOT / "src" / "gradwatch").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "Finding":
                if node.args:  # Finding(kind, layer, ...) from the run store's rows
                    continue
                kind = next((k.value for k in node.keywords if k.arg == "kind"), None)
                assert isinstance(kind, ast.Constant), f"{path}: a Finding with a computed kind"
                kinds.add(kind.value)
    return kinds


def test_the_findings_catalogue_lists_every_kind_the_code_can_emit():
    catalogue = (ROOT / "docs" / "findings.md").read_text()
    listed = re.findall(r"^### `(\w+)`$", catalogue, flags=re.M)
    assert len(listed) == len(set(listed))
    assert set(listed) == emitted_kinds() == set(FINDING_KINDS)
    for kind in listed:
        entry = catalogue.split(f"### `{kind}`")[1].split("\n### ")[0]
        assert "**When.**" in entry and "**Remedy" in entry, kind


def test_the_site_builds_in_strict_mode(tmp_path):
    """`make docs`: a broken link, a missing page or a docstring MkDocs cannot read fails."""
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    assert (tmp_path / "findings" / "index.html").is_file()
    assert "gradwatch.watch" in (tmp_path / "api" / "index.html").read_text()
