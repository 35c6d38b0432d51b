"""Conditions that must hold on several probe steps in a row before a rule speaks."""

from __future__ import annotations

from typing import Any

# What a rule keeps across the blocks of one run (running windows, streaks, the first values).
Memory = dict[str, Any]


def streak(memory: dict[str, Any], key: Any, step: int, holds: bool, needed: int) -> int | None:
    """Track a condition per `key` over successive probe steps (in a rule's `memory`, so streaks
    carry across blocks): the first step of the current streak once it has held `needed` probe
    steps in a row, else None. A probe step where it does not hold ends the streak."""
    streaks = memory.setdefault("streaks", {})
    if not holds:
        streaks.pop(key, None)
        return None
    first, length = streaks.get(key, (step, 0))
    streaks[key] = (first, length + 1)
    return first if length + 1 >= needed else None
