"""The result of `gw.gradcheck`: one `GradcheckRow` per parameter tensor and per module, gathered
in a `GradcheckReport` that prints as a table (plain text, or rich in a terminal)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

STATUSES = ("ok", "mismatch", "inconclusive")


@dataclass(frozen=True, slots=True)
class GradcheckRow:
    """One comparison: a parameter's directional derivative or a module's VJP."""

    name: str
    kind: str  # "parameter" | "module"
    status: str  # "ok" | "mismatch" | "inconclusive"
    analytic: float
    numeric: float
    rel_error: float
    reason: str = ""


@dataclass(frozen=True)
class GradcheckReport:
    """What `gw.gradcheck` found: `ok` is True when no row is a mismatch."""

    rows: list[GradcheckRow]
    culprits: list[str]
    evaluations: int
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.status != "mismatch" for r in self.rows)

    def __str__(self) -> str:
        counts = {s: sum(r.status == s for r in self.rows) for s in STATUSES}
        head = (
            "gradcheck: backward agrees with finite differences"
            if self.ok
            else f"gradcheck: WRONG BACKWARD in {', '.join(repr(c) for c in self.culprits)}"
        )
        lines = [
            head,
            f"{len(self.rows)} checks ({counts['ok']} ok, {counts['mismatch']} "
            f"mismatch, {counts['inconclusive']} inconclusive), "
            f"{self.evaluations} forward evaluations",
        ]
        lines += [f"note: {n}" for n in self.notes]
        width = max([len(r.name or "(model)") for r in self.rows] + [4])
        lines.append(
            f"{'name':<{width}}  {'kind':<9}  {'status':<12}  {'analytic':>12}  "
            f"{'numeric':>12}  {'rel err':>8}  reason"
        )
        order = sorted(
            self.rows, key=lambda r: (r.name not in self.culprits, STATUSES.index(r.status) != 1)
        )
        for r in order:
            lines.append(
                f"{r.name or '(model)':<{width}}  {r.kind:<9}  {r.status:<12}  "
                f"{r.analytic:>12.5g}  {r.numeric:>12.5g}  {r.rel_error:>8.1e}  "
                f"{r.reason}"
            )
        return "\n".join(lines)

    def __rich__(self) -> Any:
        from rich.table import Table

        table = Table(title=str(self).splitlines()[0], caption=str(self).splitlines()[1])
        for column in ("name", "kind", "status", "analytic", "numeric", "rel err", "reason"):
            table.add_column(column)
        style = {"ok": "green", "mismatch": "bold red", "inconclusive": "yellow"}
        for r in sorted(self.rows, key=lambda r: r.name not in self.culprits):
            table.add_row(
                r.name or "(model)",
                r.kind,
                f"[{style[r.status]}]{r.status}[/]",
                f"{r.analytic:.5g}",
                f"{r.numeric:.5g}",
                f"{r.rel_error:.1e}",
                r.reason,
            )
        return table
