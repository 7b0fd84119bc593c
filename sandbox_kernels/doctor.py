"""``sandbox-kernels doctor``: can each runtime work here, and if not, what to do."""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from .errors import SandboxError
from .runtimes.registry import RUNTIMES


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


def _check_module(name: str) -> Callable[[RuntimeReport], None] | None:
    module = {
        "docker": "sandbox_kernels.runtimes.docker.doctor",
        "libvirt": "sandbox_kernels.runtimes.vm.doctor",
        "k8s": "sandbox_kernels.runtimes.k8s.doctor",
        "ssh": "sandbox_kernels.runtimes.ssh.doctor",
    }[name]
    try:
        return importlib.import_module(module).check  # type: ignore[no-any-return]
    except ModuleNotFoundError:
        return None


def check(name: str) -> RuntimeReport:
    """Check one runtime; never raises for an unusable runtime, it reports it."""
    runtime = RUNTIMES[name]
    report = RuntimeReport(name, runtime.kernel_name, ok=True)
    checker = _check_module(name)
    if checker is None:
        report.ok = False
        report.details.append("this runtime is not part of this version of sandbox-kernels")
        return report
    try:
        checker(report)
    except SandboxError as e:
        report.ok = False
        report.details.append(str(e))
    return report


def check_all() -> list[RuntimeReport]:
    """Check every known runtime."""
    return [check(name) for name in RUNTIMES]


def format_reports(reports: list[RuntimeReport]) -> str:
    """Human-readable doctor output."""
    lines = []
    for r in reports:
        lines.append(f"{'OK ' if r.ok else 'NO '} {r.runtime:8} kernel {r.kernel_name}")
        lines += [f"      {d}" for d in r.details]
        lines += [f"      fix: {f}" for f in r.fixes]
    return "\n".join(lines)
