"""`import gradwatch` costs little beyond `import torch`: distributed tensors, dynamo and the
optional extras load only when used. Judged by which modules an import loads (in fresh
processes), not by wall-clock time."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = (
    "torch._dynamo",  # about 0.6 s on 2 cores: loaded when a watcher is built
    "torch.distributed.tensor",  # about 0.8 s: never loaded by gradwatch itself
    "sympy",
    "matplotlib",
    "tensorboard",
    "wandb",
    "mlflow",
    "lightning",
    "transformers",
)


def loaded_after(statement: str) -> set[str]:
    code = f"import json, sys; {statement}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    return set(json.loads(out.stdout.splitlines()[-1]))


def heavy(modules: set[str]) -> set[str]:
    return {m for m in modules if m.split(".")[0] in HEAVY or m.startswith(HEAVY)}


def test_import_gradwatch_loads_nothing_heavy_that_import_torch_does_not():
    baseline = heavy(loaded_after("import torch"))
    assert heavy(loaded_after("import gradwatch")) - baseline == set()


def test_watching_loads_dynamo_so_compiled_models_skip_the_hooks_frames():
    modules = loaded_after(
        "import torch, gradwatch as gw, tempfile, pathlib; "
        "w = gw.watch(torch.nn.Linear(2, 2), run_dir=pathlib.Path(tempfile.mkdtemp()) / 'r'); "
        "w.close()"
    )
    assert "torch._dynamo" in modules


# The layers below the watcher: they must not import `gradwatch.watcher` nor the package face
# (`import gradwatch`, `from gradwatch import ...`), so that imports run one way.
BELOW = ("stats", "detect", "guards", "sinks", "report")
BELOW_MODULES = (
    "arguments", "config", "distributed", "errors", "extras", "gradcheck_math", "gradcheck_report",
    "inventory", "probe_records", "publishing", "recorded_block", "run_reader", "run_start",
    "run_writer", "script_models", "step_recorder", "store", "structures", "version",
)  # fmt: skip


def test_imports_run_one_way():
    import ast
    from pathlib import Path

    import gradwatch

    package = Path(gradwatch.__file__).parent
    files = [p for layer in BELOW for p in (package / layer).rglob("*.py")]
    files += [package / f"{name}.py" for name in BELOW_MODULES]
    upward = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] if node.module != "gradwatch" else ["gradwatch"]
            else:
                continue
            upward += [
                f"{path.relative_to(package)}: {n}"
                for n in names
                if n in ("gradwatch", "gradwatch.watcher")
            ]
    assert files and not upward, upward


def test_no_source_file_over_400_lines_and_no_function_over_60():
    """The house's size rules (issue 27): rooms a newcomer can read."""
    import ast
    from pathlib import Path

    import gradwatch

    package = Path(gradwatch.__file__).parent
    long_files, long_functions = [], []
    for path in sorted(package.rglob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > 400:
            long_files.append(str(path.relative_to(package)))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 60:
                    long_functions.append(f"{path.relative_to(package)}:{node.name} ({length})")
    assert not long_files and not long_functions, (long_files, long_functions)
