"""The benchmark's data: one :class:`Row` per (figure, runtime), its statistics and its goal.

A row holds raw samples; the median, p90 and the ratio to the local kernel are derived when
the run ends, so the JSON keeps everything needed to recompute them. Goals are written as data
(``Goal``) next to the figure they judge, never as assertions: a missed goal is a line in the
table, not a failure.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Goal:
    """A target for one row's median.

    Attributes:
        op: ``"<="`` (lower is better) or ``">="`` (higher is better).
        value: the bound.
        relative: True when ``value`` is a ratio to the local kernel's median, False when it is
            in the row's own unit.
    """

    op: str
    value: float
    relative: bool = True

    def text(self, unit: str) -> str:
        return f"{self.op}{self.value:g}x" if self.relative else f"{self.op}{self.value:g} {unit}"

    def met(self, median: float | None, ratio: float | None) -> bool | None:
        actual = ratio if self.relative else median
        if actual is None or math.isnan(actual):
            return None
        return actual <= self.value if self.op == "<=" else actual >= self.value


@dataclass
class Row:
    """One figure for one runtime.

    Attributes:
        figure: what is measured, e.g. ``"start-to-ready"``.
        runtime: ``local``, ``docker``, ``vm``, ``ssh``, ``k8s``.
        unit: ``s``, ``ms``, ``MB/s`` or ``MiB``.
        samples: the raw measurements.
        baseline: the figure whose ``local`` row is the denominator of the ratio (default: the
            same figure); None for rows with no local counterpart.
        goal: the target, if the project set one.
        note: what a reader needs to interpret the number (contention, how it was measured).
        skipped: why there are no samples (runtime missing, measurement failed).
        paired: local-kernel samples of the same figure taken alternately with this row's
            (same moment, same host load); when present the ratio is against their median
            instead of the local row's, so contention from other work cancels out.
    """

    figure: str
    runtime: str
    unit: str
    samples: list[float] = field(default_factory=list)
    baseline: str | None = ""
    goal: Goal | None = None
    note: str = ""
    skipped: str = ""
    paired: list[float] = field(default_factory=list)
    ratio: float | None = None
    met: bool | None = None

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    @property
    def p90(self) -> float | None:
        return percentile(self.samples, 90) if self.samples else None

    def finish(self, local: Row | None) -> None:
        """Compute the ratio (to the paired samples, else ``local``'s median) and the verdict."""
        base = statistics.median(self.paired) if self.paired else (local.median if local else None)
        if base and self.median is not None:
            self.ratio = self.median / base
        if self.goal is not None:
            self.met = self.goal.met(self.median, self.ratio)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(median=self.median, p90=self.p90,
                    goal=self.goal.text(self.unit) if self.goal else None)
        return data


def percentile(samples: list[float], pct: float) -> float:
    """The ``pct``-th percentile by linear interpolation between closest ranks."""
    ordered = sorted(samples)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * pct / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


class Results:
    """All rows of one run, in the order they were first recorded."""

    def __init__(self) -> None:
        self.rows: list[Row] = []

    def row(self, figure: str, runtime: str, unit: str, **kwargs: Any) -> Row:
        """The row for (figure, runtime), created on first use with ``kwargs``."""
        for row in self.rows:
            if row.figure == figure and row.runtime == runtime:
                return row
        row = Row(figure, runtime, unit, **kwargs)
        self.rows.append(row)
        return row

    def skip(self, figure: str, runtime: str, unit: str, reason: str, **kwargs: Any) -> Row:
        """Record that (figure, runtime) was not measured, and why."""
        row = self.row(figure, runtime, unit, **kwargs)
        if not row.samples:
            row.skipped = reason
        else:
            row.note = "; ".join(filter(None, [row.note, f"incomplete: {reason}"]))
        return row

    def finish(self) -> None:
        """Derive ratios to the local kernel and goal verdicts for every row."""
        for row in self.rows:
            base = row.figure if row.baseline == "" else row.baseline
            row.finish(self.find(base, "local") if base else None)

    def find(self, figure: str, runtime: str) -> Row | None:
        for row in self.rows:
            if row.figure == figure and row.runtime == runtime:
                return row
        return None
