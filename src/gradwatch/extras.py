"""Optional dependencies: imported only where a feature needs them, with an error that names the
pip extra to install (`import gradwatch` itself never imports one)."""

from __future__ import annotations

import importlib
from types import ModuleType

# Top-level package -> the gradwatch extra that installs it.
EXTRAS: dict[str, str] = {
    "matplotlib": "report",
    "rich": "report",
    "tensorboard": "tensorboard",
    "sklearn": "demo",
    "lightning": "lightning",
    "transformers": "transformers",
    "accelerate": "transformers",
    "wandb": "wandb",
    "mlflow": "mlflow",
}


def optional(module: str, purpose: str) -> ModuleType:
    """Import `module` (e.g. "rich.console"), or raise an ImportError that says `purpose` needs it
    and which extra installs it: "gradwatch summary needs rich: pip install 'gradwatch[report]'"."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        package = module.partition(".")[0]
        raise ImportError(
            f"{purpose} needs {package}: pip install 'gradwatch[{EXTRAS[package]}]'"
        ) from exc
