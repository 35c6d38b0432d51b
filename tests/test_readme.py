"""The README's usage examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert BLOCKS


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {})
    assert capsys.readouterr().out


RESULTS = README.parent / "benchmarks" / "results"
# A whole decimal number (not part of 2.13.0 or 1.0412); one marked as computed from quoted ones
# (≈1.13, or a share like 6.3%) is not itself a quote.
NUMBER = r"(?<![\d.≈]){}(?!\d|\.\d|%)"


def quoting_blocks() -> list[tuple[list[str], str]]:
    """(results files, text) of each README paragraph that names `results/<file>.md`, and of a
    table right after such a paragraph (it quotes the same files)."""
    found, named = [], []
    for block in README.read_text().split("\n\n"):
        files = re.findall(r"results/([\w.-]+\.md)", block)
        if files:
            named = files
            found.append((files, block))
        elif named and block.lstrip().startswith("|"):
            found.append((named, block))
        else:
            named = []
    return found


def test_readme_quotes_benchmark_numbers_from_results_files():
    """Every decimal number in a README paragraph (or its table) that names a results file is
    in that file: a number the code no longer gives cannot stay in the README."""
    blocks = quoting_blocks()
    assert blocks
    missing = []
    for files, block in blocks:
        assert all((RESULTS / f).is_file() for f in files), files
        text = "\n".join((RESULTS / f).read_text() for f in files)
        for number in re.findall(NUMBER.format(r"\d+\.\d+"), block):
            if not re.search(NUMBER.format(re.escape(number)), text):
                missing.append(f"{number} (quoted with {', '.join(files)})")
    assert not missing, "README numbers not in the results files: " + "; ".join(missing)
