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
        settings = record.settings(config)
        checker(report, settings)
        if getattr(settings, "supports_pool", False):
            report.details.append(pool_line(settings, record.kernel_name))
    except SandboxError as e:
        report.ok = False
        report.details.append(str(e))
    return report


def pool_line(settings: Any, kernel_name: str) -> str:
    """The runtime's warm pool: its size setting, and what the agent holds for the kernelspec."""
    from .pool.client import PoolClient

    if not settings.pool_size:
        return "warm pool: off (pool_size 0); set pool_size to keep sandboxes ready"
    status = PoolClient(settings.state_root, timeout=10).status()
    pools = [p for p in status["pools"] if p["kernel_name"] == kernel_name]
    if not status["running"] or not pools:
        return (f"warm pool: pool_size {settings.pool_size}, not started yet (the first kernel "
                "start starts the agent)")
    pool = pools[0]
    return (f"warm pool: {pool['ready']} of {pool['target']} ready"
            f"{', 1 starting' if pool['starting'] else ''}, holding "
            f"{pool['memory_bytes'] / 2**20:.0f} MiB (agent pid {status.get('pid')})")


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
