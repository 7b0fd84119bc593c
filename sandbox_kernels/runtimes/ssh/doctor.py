"""Doctor checks for the SSH host runtime."""

from __future__ import annotations

import os

from ...doctor import RuntimeReport


def check(report: RuntimeReport) -> None:
    """paramiko importable; is a host configured through the environment?"""
    import paramiko

    report.details.append(f"paramiko {paramiko.__version__}")
    host = os.environ.get("SANDBOX_SSH_HOST")
    if host:
        report.details.append(f"SANDBOX_SSH_HOST={host}")
    else:
        report.details.append("no default host: set 'host' in a kernelspec or SANDBOX_SSH_HOST")
