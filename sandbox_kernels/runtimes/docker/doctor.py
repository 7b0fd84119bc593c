"""Doctor checks for the Docker runtime."""

from __future__ import annotations

from typing import Any

from ...doctor import RuntimeReport
from ...errors import SandboxError
from .engine import DockerEngine


def check(report: RuntimeReport, settings: Any) -> None:
    """Engine reachable? The configured image (``settings.image``) present?"""
    try:
        engine = DockerEngine(timeout=10)
    except SandboxError as e:
        report.ok = False
        report.details.append(str(e))
        report.fixes.append("apt-get install docker.io && (dockerd > /var/log/dockerd.log 2>&1 &)")
        return
    try:
        version = engine.client.version().get("Version", "?")
        report.details.append(f"Docker engine {version} reachable")
        try:
            engine.check_image(settings.image)
            report.details.append(f"image {settings.image} present")
        except SandboxError:
            report.ok = False
            report.details.append(f"image {settings.image} missing")
            report.fixes.append("sandbox-kernels image build docker")
        report.details.append(f"container memory snapshots: {criu_status(engine)}")
    finally:
        engine.close()


def criu_status(engine: DockerEngine) -> str:
    """Whether ``docker checkpoint`` (CRIU) could work here: detected, never assumed."""
    import shutil

    if not shutil.which("criu"):
        return "unavailable (criu is not installed); snapshots keep files only"
    problem = _criu_check()
    if problem:
        return f"unavailable (`criu check` fails on this host: {problem}); snapshots keep files only"
    if not engine.client.info().get("ExperimentalBuild"):
        return "unavailable (the engine is not in experimental mode, needed for checkpoints)"
    return "CRIU works and the engine is experimental (not used by this version)"


def _criu_check() -> str:
    """The first error line of ``criu check``, or "" when it passes."""
    import subprocess

    try:
        done = subprocess.run(["criu", "check"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    if done.returncode == 0:
        return ""
    lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
    return lines[0].strip() if lines else f"exit code {done.returncode}"
