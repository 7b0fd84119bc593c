"""Doctor checks for the SSH host runtime."""

from __future__ import annotations

from typing import Any

from ...doctor import RuntimeReport


def check(report: RuntimeReport, settings: Any) -> None:
    """paramiko importable; is a default host configured (the ``host`` setting)?"""
    import paramiko

    report.details.append(f"paramiko {paramiko.__version__}")
    host = settings.host
    if host:
        report.details.append(f"default host {host} (setting 'host', env SANDBOX_SSH_HOST)")
    else:
        report.details.append("no default host: set 'host' in a kernelspec or SANDBOX_SSH_HOST")
