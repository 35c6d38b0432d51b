"""What the probes' hooks share: how they behave under torch.compile, and the failsafe that
keeps a failure of gradwatch's own code out of the user's training."""

from __future__ import annotations

import functools
import logging
import traceback
from collections.abc import Callable
from types import CodeType
from typing import Any, TypeVar

Hook = TypeVar("Hook", bound=Callable[..., Any])
Shield = Callable[[Hook], Hook]
logger = logging.getLogger("gradwatch")


def unshielded(hook: Hook) -> Hook:
    """The default `shield` of a probe built outside a watcher (tests, tools): the hook as is."""
    return hook


class Failsafe:
    """The boundary between gradwatch's hooks and the training they watch (DESIGN invariant 8).

    `shield(hook)` wraps a hook so that an exception in it (a bug in gradwatch, an input it did
    not foresee; not one of `passes`, which a guard raises on purpose) is caught, reported once
    with its traceback, and trips the failsafe: the hook
    returns None (a hook's "change nothing"), and from then on every shielded hook returns at
    once. The owner (the watcher) closes itself at its next safe point; the training goes on.
    Cost: one Python call per hook call; no host sync.
    """

    def __init__(self, owner: str, passes: tuple[type[BaseException], ...] = ()) -> None:
        self.owner = owner
        self.passes = passes  # exceptions meant for the user (a guard that stops training)
        self.error: BaseException | None = None
        self.where = ""

    @property
    def tripped(self) -> bool:
        return self.error is not None

    def shield(self, hook: Hook) -> Hook:
        @functools.wraps(hook)
        def shielded(*args: Any, **kwargs: Any) -> Any:
            if self.error is not None:
                return None
            try:
                return hook(*args, **kwargs)
            except self.passes:
                raise
            except Exception as exc:
                self.trip(exc, getattr(hook, "__qualname__", repr(hook)))
                return None

        return shielded  # type: ignore[return-value]

    def trip(self, error: BaseException, where: str) -> None:
        """Record the first failure and report it; later ones are consequences, left quiet."""
        if self.error is not None:
            return
        self.error, self.where = error, where
        logger.error(
            "gradwatch: %s failed in %s and stops watching; the training goes on unwatched. "
            "Please report this with the traceback:\n%s",
            self.owner,
            where,
            "".join(traceback.format_exception(error)).rstrip(),
        )


def eager_unless_traced(hook: Hook) -> Hook:
    """Keep torch.compile from compiling `hook` (and what it calls) as a frame of its own.

    Inside a compiled forward, dynamo inlines a module's forward hooks into the graph, as it should.
    But where a forward runs eagerly under compile (`model.compile()` on torch.nn modules that
    dynamo leaves alone), dynamo would compile each hook call as a separate frame, once per
    closure and per state of the probes, until it hits its recompile limit. Marking the code
    "skip, recursively" (its exec strategy; inlining ignores it) runs such calls eagerly.

    Marking needs dynamo, whose import costs about 0.6 s: the code is collected here and marked
    when the first watcher is built (`mark_eager_hooks`), before any of these hooks can run;
    after that, at once. torch versions without this API compile them as before.
    """
    _unmarked.add(hook.__code__)
    if _marking:
        mark_eager_hooks()
    return hook


def mark_eager_hooks() -> None:
    """Mark the code collected by `eager_unless_traced` (imports dynamo; a watcher calls it)."""
    global _marking
    _marking = True
    try:
        from torch._dynamo.eval_frame import set_code_exec_strategy
        from torch._dynamo.types import FrameAction, FrameExecStrategy
    except ImportError:  # pragma: no cover - older torch
        _unmarked.clear()
        return
    for code in _unmarked:
        set_code_exec_strategy(code, FrameExecStrategy(FrameAction.SKIP, FrameAction.SKIP))
    _unmarked.clear()


_unmarked: set[CodeType] = set()
_marking = False  # True once a watcher asked: later hooks are marked as they are made


# Every shielded hook runs the same wrapper code: keep it out of dynamo's frames once, as the
# hooks themselves are (`eager_unless_traced`).
eager_unless_traced(Failsafe("").shield(unshielded))
