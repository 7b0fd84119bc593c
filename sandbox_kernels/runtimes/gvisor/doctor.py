"""Doctor checks for the gVisor runtime: the Docker ones, then whether runsc works here and on
which platform (a throwaway container is started on it: detected, never assumed)."""

from __future__ import annotations

import secrets
import shutil
from typing import Any

from ...doctor import RuntimeReport
from ...errors import SandboxError
from ...labels import owner_labels
from ..docker.doctor import check as docker_check
from ..docker.engine import DockerEngine
from .platforms import choose_platform, registered_platforms

#: What gVisor's sentry reports as the kernel release (the host's is never 4.4.0 here).
GVISOR_RELEASE = "4.4.0"
_FIX_REGISTER = "scripts/setup.sh (or as root: python -m sandbox_kernels.runtimes.gvisor.engine_config)"


def check(report: RuntimeReport, settings: Any) -> None:
    """Engine and image (the Docker check), runsc installed and registered, the chosen
    platform (``settings.platform``) starts a container whose kernel is gVisor's, and
    whether memory snapshots (``runsc checkpoint``) could work."""
    docker_check(report, settings)
    if not report.ok:
        return
    if shutil.which("runsc") is None:
        report.details.append("runsc is not installed on this host")
        report.fixes.append("apt-get install runsc && " + _FIX_REGISTER)
    engine = DockerEngine(timeout=10)
    try:
        info = engine.client.info()
        registered = registered_platforms(dict(info.get("Runtimes") or {}))
        try:
            choice = choose_platform(settings.platform, registered)
        except SandboxError as e:
            report.ok = False
            report.details.append(str(e))
            report.fixes.append(_FIX_REGISTER)
            return
        report.details.append(f"gVisor platforms registered: {', '.join(registered)}")
        report.details.append(("WARNING: " if choice.fallback else "") + choice.reason)
        release = probe_release(engine, settings.image, choice.runtime)
        if release == GVISOR_RELEASE:
            report.details.append(f"runsc works here: a container on {choice.runtime} "
                                  f"reports gVisor's kernel {release}")
        else:
            report.ok = False
            report.details.append(f"a container on {choice.runtime} did not run under gVisor: {release}")
            report.fixes.append(_FIX_REGISTER)
        report.details.append("memory snapshots: " + checkpoint_status(bool(info.get("ExperimentalBuild"))))
    finally:
        engine.close()


def probe_release(engine: DockerEngine, image: str, runtime: str) -> str:
    """``uname -r`` in a throwaway container on ``runtime`` (removed again), or what failed."""
    name = f"sandbox-kernels-gvisor-doctor-{secrets.token_hex(4)}"
    cid = ""
    try:
        cid = engine.create(image=image, command=["uname", "-r"], name=name, runtime=runtime,
                            network_mode="none", cap_drop=["ALL"], user="1000:1000",
                            labels=owner_labels(name, "gvisor"))
        engine.start(cid)
        engine.wait_stopped(cid, 60)
        state = engine.state(cid) or {}
        out = engine.logs(cid, tail=5).strip()
        if state.get("ExitCode") != 0:
            return f"exit code {state.get('ExitCode')}: {out}"
        return out
    except SandboxError as e:
        return str(e)
    finally:
        engine.remove(cid or name)


def checkpoint_status(experimental: bool) -> str:
    """Whether ``docker checkpoint`` with runsc could work: it needs an experimental engine."""
    if not experimental:
        return ("unavailable (docker checkpoint needs an experimental engine); snapshots keep "
                "files only")
    return "the engine is experimental, so runsc checkpoint might work (not used by this version)"
