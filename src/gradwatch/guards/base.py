"""The `Guard` protocol and the `Event` record a guard's action leaves in the run store."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

EVENT_KINDS: tuple[str, ...] = ("clip", "skip", "rollback")


@dataclass(frozen=True, slots=True)
class Event:
    """What a guard did at a step: `kind` is one of EVENT_KINDS, `detail` holds its numbers."""

    kind: str
    step: int
    guard: str
    detail: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Guard(Protocol):
    """Acts on the gradients of one optimizer step, before the update.

    `apply` runs in the optimizer's step pre-hook with the step number and the pre-guard global
    gradient norm (a device tensor); it returns False to skip the optimizer step.
    """

    def apply(self, step: int, global_norm: Any) -> bool: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
