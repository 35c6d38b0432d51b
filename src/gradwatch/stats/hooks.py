"""What the probes' hooks share: how they behave under torch.compile."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

Hook = TypeVar("Hook", bound=Callable[..., Any])


def eager_unless_traced(hook: Hook) -> Hook:
    """Keep torch.compile from compiling `hook` (and what it calls) as a frame of its own.

    Inside a compiled forward, dynamo inlines a module's forward hooks into the graph, as it should.
    But where a forward runs eagerly under compile (`model.compile()` on torch.nn modules that
    dynamo leaves alone), dynamo would compile each hook call as a separate frame, once per
    closure and per state of the probes, until it hits its recompile limit. Marking the code
    "skip, recursively" (its exec strategy; inlining ignores it) runs such calls eagerly.
    torch versions without this API compile them as before.
    """
    try:
        from torch._dynamo.eval_frame import set_code_exec_strategy
        from torch._dynamo.types import FrameAction, FrameExecStrategy
    except ImportError:  # pragma: no cover - older torch
        return hook
    set_code_exec_strategy(hook.__code__, FrameExecStrategy(FrameAction.SKIP, FrameAction.SKIP))
    return hook
