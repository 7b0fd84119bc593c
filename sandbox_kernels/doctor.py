"""``sandbox-kernels doctor``: can each runtime work here, and if not, what to do.

Each runtime's record names its check (``runtimes/<name>/doctor.py``); the check reads the
runtime's settings (its provisioner's traits, built from the admin's configuration and the
environment, launching nothing), never the environment itself.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import SandboxError
from .runtimes import registry


@dataclass
class RuntimeReport:
    """One runtime's readiness on this machine."""

    runtime: str
    kernel_name: str
    ok: bool
    details: list[str] = field(default_factory=list)
    fixes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (used by the server extension's ``runtimes`` endpoint)."""
        return asdict(self)


def check(name: str, config: Any = None) -> RuntimeReport:
    """Check one runtime with the admin's Jupyter ``config`` (default: none, the environment
    only); never raises for an unusable runtime, it reports it.

    Raises:
        SandboxUnavailable: ``name`` is not a known runtime.
    """
    record = registry.get(name)
    report = RuntimeReport(record.name, record.kernel_name, ok=True)
    try:
        checker = record.load("doctor")
        checker(report, record.settings(config))
    except SandboxError as e:
        report.ok = False
        report.details.append(str(e))
    return report


def check_all(config: Any = None) -> list[RuntimeReport]:
    """Check every known runtime (blocking: call it off the event loop)."""
    return [check(record.name, config) for record in registry.records()]


def format_reports(reports: list[RuntimeReport]) -> str:
    """Human-readable doctor output."""
    lines = []
    for r in reports:
        lines.append(f"{'OK ' if r.ok else 'NO '} {r.runtime:8} kernel {r.kernel_name}")
        lines += [f"      {d}" for d in r.details]
        lines += [f"      fix: {f}" for f in r.fixes]
    return "\n".join(lines)
