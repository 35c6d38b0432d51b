"""Guards act on the gradients of a step inside the optimizer's step pre-hook."""

from gradwatch.guards.base import Event, Guard

__all__ = ["Event", "Guard"]
