"""Sinks receive each committed statistics block and the findings, in the writer thread."""

from gradwatch.sinks.base import Sink
from gradwatch.sinks.tensorboard import TensorBoard, export_tensorboard

__all__ = ["Sink", "TensorBoard", "export_tensorboard"]
