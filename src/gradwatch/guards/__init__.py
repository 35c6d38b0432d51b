"""Guards act on the gradients of each step inside the optimizer's step pre-hook, in order.

`gw.watch(model, optimizer, guards=[gw.guards.SkipNonFinite(), gw.guards.ZClip()])`.
"""

from gradwatch.guards.base import Guard, GuardContext, StopTraining
from gradwatch.guards.clip import AGC, AutoClip, ClipNorm, ClipValue, ZClip
from gradwatch.guards.recover import Rollback, SkipNonFinite

__all__ = [
    "AGC",
    "AutoClip",
    "ClipNorm",
    "ClipValue",
    "Guard",
    "GuardContext",
    "Rollback",
    "SkipNonFinite",
    "StopTraining",
    "ZClip",
]
