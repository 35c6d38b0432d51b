"""Sinks receive each committed statistics block and the findings, in the writer thread."""

from gradwatch.sinks.base import Sink

__all__ = ["Sink"]
