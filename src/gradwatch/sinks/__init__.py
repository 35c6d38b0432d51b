"""Sinks receive each committed statistics block and the findings, in the writer thread.

`TensorBoard`, `WandB` and `MLflow` import their package only when one is created.
"""

from gradwatch.sinks.base import Sink
from gradwatch.sinks.logger import Logger
from gradwatch.sinks.mlflow import MLflow
from gradwatch.sinks.tensorboard import TensorBoard, export_tensorboard
from gradwatch.sinks.wandb import WandB

__all__ = ["Logger", "MLflow", "Sink", "TensorBoard", "WandB", "export_tensorboard"]
