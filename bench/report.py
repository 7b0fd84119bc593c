"""Output: the printed table, the JSON files and the PNG of the start-up distributions."""

from __future__ import annotations

import json
import random
import textwrap
from pathlib import Path
from typing import Any

from .results_model import Results, Row


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _verdict(row: Row) -> str:
    if row.goal is None:
        return ""
    goal = row.goal.text(row.unit)
    if row.met is None:
        return f"{goal} n/a"
    return f"{goal} {'met' if row.met else 'MISSED'}"


def table(results: Results, meta: dict[str, Any]) -> str:
    """The human-readable table, with numbered notes under it."""
    lines = [
        f"sandbox-kernels benchmark, {meta['started']}, mode {meta['mode']}, run time "
        f"{meta['duration_s']:.0f} s",
        f"host: {meta['host']['cpus']} cores; load average {meta['host']['load_before']:.1f} at start, "
        f"{meta['host']['load_after']:.1f} at end; sandboxes of other users running at start: "
        f"{meta['host']['others_at_start']}",
    ]
    lines += [f"  {name}: {text}" for name, text in meta.get("runtime_notes", {}).items()]
    lines += ["", "x local: median / median of local samples taken alternately with it (or of the "
              "local row); n: samples", ""]
    header = f"{'figure':40} {'runtime':8} {'n':>4} {'median':>8} {'p90':>8} {'x local':>8}  goal"
    lines += [header, "-" * len(header)]
    notes: list[str] = []
    last_figure = None
    for row in _grouped(results.rows):
        label = f"{row.figure} [{row.unit}]" if row.figure != last_figure else ""
        last_figure = row.figure
        ref = ""
        if row.note:
            if row.note not in notes:
                notes.append(row.note)
            ref = f" [{notes.index(row.note) + 1}]"
        if row.skipped:
            lines.append(f"{label:40} {row.runtime:8} {'':>4} skipped: {row.skipped}")
            continue
        ratio = f"{row.ratio:.2f}x" if row.ratio is not None else "-"
        lines.append(f"{label:40} {row.runtime:8} {len(row.samples):>4} {_num(row.median):>8} "
                     f"{_num(row.p90):>8} {ratio:>8}  {_verdict(row)}{ref}".rstrip())
    if notes:
        lines += ["", "notes:"]
        for i, note in enumerate(notes, 1):
            lines += textwrap.wrap(note, 100, initial_indent=f" [{i}] ", subsequent_indent="     ")
    goals = [r for r in results.rows if r.goal is not None]
    met = sum(1 for r in goals if r.met)
    missed = [f"{r.figure}/{r.runtime}" for r in goals if r.met is False]
    lines += ["", f"goals: {met} met, {len(missed)} missed"
              + (f" ({', '.join(missed)})" if missed else "")
              + f", {len(goals) - met - len(missed)} not measured"]
    return "\n".join(lines)


def _grouped(rows: list[Row]) -> list[Row]:
    """Rows grouped by figure (in order of first appearance), runtimes in recording order."""
    order = {f: i for i, f in reversed(list(enumerate(r.figure for r in rows)))}
    return sorted(rows, key=lambda r: order[r.figure])


def write_json(results: Results, meta: dict[str, Any], directory: Path, stamp: str) -> Path:
    """Write ``<stamp>.json`` and ``latest.json``; returns the timestamped path."""
    directory.mkdir(parents=True, exist_ok=True)
    data = {"meta": meta, "rows": [r.to_dict() for r in results.rows]}
    text = json.dumps(data, indent=1) + "\n"
    path = directory / f"{stamp}.json"
    path.write_text(text)
    (directory / "latest.json").write_text(text)
    return path


def write_plot(results: Results, figures: list[str], meta: dict[str, Any], directory: Path,
               stamp: str) -> Path | None:
    """Box plots of the start-up samples per runtime (log scale); ``<stamp>.png`` and ``latest.png``.

    Returns:
        The timestamped path, or None when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = [(f, [r for r in results.rows if r.figure == f and r.samples]) for f in figures]
    panels = [(f, rows) for f, rows in panels if rows]
    if not panels:
        return None
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.8), squeeze=False, sharey=True)
    rng = random.Random(0)
    for ax, (figure, rows) in zip(axes[0], panels):
        ax.boxplot([r.samples for r in rows], showfliers=False, widths=0.5)
        for i, r in enumerate(rows, 1):
            ax.scatter([i + rng.uniform(-0.12, 0.12) for _ in r.samples], r.samples, s=12, alpha=0.6)
        ax.set_xticks(range(1, len(rows) + 1),
                      [f"{r.runtime}\n{_num(r.median)} s" + (f"\n{r.ratio:.1f}x" if r.ratio else "")
                       for r in rows])
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_ylabel("seconds (log scale)")
        ax.set_title(figure)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.suptitle(f"sandbox-kernels start-up, {meta['started']} ({meta['mode']}; median and ratio to local)")
    fig.tight_layout()
    path = directory / f"{stamp}.png"
    fig.savefig(path, dpi=110)
    fig.savefig(directory / "latest.png", dpi=110)
    plt.close(fig)
    return path
