"""The package version (also in pyproject.toml): the face re-exports it, the run metadata
records it."""

__version__ = "0.1.0"
