"""The gVisor runtime (``sandbox-gvisor``) against the real Docker engine with runsc registered.

The shared lifecycle suite, plus what is gVisor's own: the kernel runs on gVisor's kernel
(``uname -r`` is 4.4.0), on the platform the setting names, with the Docker runtime's limits;
filesystem snapshots work as Docker's do.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from helpers.orphans import docker_containers
from lifecycle import LifecycleSuite, Runtime, run_cell, start

pytestmark = pytest.mark.docker

KERNEL = "sandbox-gvisor"
#: gVisor's sentry reports this release whatever the host runs.
GVISOR_RELEASE = "4.4.0"


def _remove(kernel_id: str) -> None:
    for cid in docker_containers(kernel_id):
        subprocess.run(["docker", "rm", "-f", cid], check=True, capture_output=True, timeout=60)


def _inspect(kernel_id: str) -> dict[str, Any]:
    (cid,) = docker_containers(kernel_id)
    out = subprocess.run(["docker", "inspect", cid], capture_output=True, text=True, check=True, timeout=30)
    return dict(json.loads(out.stdout)[0])


GVISOR = Runtime(
    kernel_name=KERNEL,
    sandbox_exists=lambda kid: bool(docker_containers(kid)),
    destroy_externally=_remove,
    bad_settings=[
        ({"image": "sandbox-kernels/no-such-image:1"}, "image"),
        ({"memory": "lots"}, "memory"),
        ({"platform": "vmware"}, "platform"),
        ({"network": "bridge"}, "network"),
        ({"pids_limit": "many"}, "pids_limit"),
    ],
    start_timeout=90,
)


class TestGVisorLifecycle(LifecycleSuite):
    @pytest.fixture
    def runtime(self) -> Runtime:
        return GVISOR


async def test_runs_on_gvisors_kernel_with_dockers_limits() -> None:
    km, kc = await start(KERNEL, timeout=GVISOR.start_timeout)
    try:
        info = _inspect(km.kernel_id)
        host = info["HostConfig"]
        choice = km.provisioner.platform_choice
        assert host["Runtime"] == choice.runtime == f"runsc-{choice.platform}"
        assert host["NetworkMode"] == "none" and host["CapDrop"] == ["ALL"]
        assert "no-new-privileges" in host["SecurityOpt"]
        assert host["Memory"] == 1024**3 and host["PidsLimit"] == 256
        out = await run_cell(kc, (
            "import os, socket\n"
            "print(os.uname().release, os.getuid(), sorted(n for _, n in socket.if_nameindex()))"))
        assert out["stdout"] == f"{GVISOR_RELEASE} 1000 ['lo']\n", out
        assert os.uname().release != GVISOR_RELEASE, "the host itself must not look like gVisor"
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)
    assert not docker_containers(km.kernel_id)


async def test_platform_setting_is_honoured_or_falls_back_loudly(kernelspec_dir: Any,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """``ptrace`` (registered wherever runsc works) is used as set; ``kvm`` is used where it
    works and otherwise falls back with a warning naming the setting."""
    from jupyter_client.kernelspec import KernelSpecManager

    for platform in ("ptrace", "kvm"):
        ksm = KernelSpecManager(kernel_dirs=[str(kernelspec_dir(KERNEL, name=platform, platform=platform))])
        caplog.clear()
        km, kc = await start(platform, ksm=ksm, timeout=GVISOR.start_timeout)
        try:
            choice = km.provisioner.platform_choice
            assert _inspect(km.kernel_id)["HostConfig"]["Runtime"] == choice.runtime
            if choice.platform != platform:
                assert choice.fallback and platform == "kvm", choice
                warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
                assert any("SANDBOX_GVISOR_PLATFORM" in w and "'kvm'" in w for w in warned), warned
            out = await run_cell(kc, "import os; print(os.uname().release)")
            assert out["stdout"] == f"{GVISOR_RELEASE}\n", out
        finally:
            kc.stop_channels()
            await km.shutdown_kernel(now=True)


async def test_filesystem_snapshot_and_rollback() -> None:
    """Files written inside gVisor reach the container's layer, so ``docker commit`` keeps them."""
    from sandbox_kernels.snapshots.service import SnapshotService

    km, kc = await start(KERNEL, timeout=GVISOR.start_timeout)
    try:
        service = SnapshotService(km.provisioner)
        assert service.capabilities().kinds == ["filesystem"]
        await run_cell(kc, "open('kept.txt', 'w').write('before')")
        await service.create("s1")
        await run_cell(kc, "open('kept.txt', 'w').write('after'); open('new.txt', 'w').write('x')")
        await service.rollback("s1")
        await kc.wait_for_ready(timeout=GVISOR.start_timeout)
        out = await run_cell(kc, "import os; print(open('kept.txt').read(), os.path.exists('new.txt'), os.uname().release)")
        assert out["stdout"] == f"before False {GVISOR_RELEASE}\n", out
        assert _inspect(km.kernel_id)["HostConfig"]["Runtime"].startswith("runsc-"), "rolled back onto gVisor"
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)
    images = subprocess.run(["docker", "images", "-q", "--filter", f"label=sandbox-kernels.kernel-id={km.kernel_id}"],
                            capture_output=True, text=True, check=True, timeout=30).stdout.split()
    assert not images, "snapshot images left behind"


def test_doctor_says_runsc_works_and_on_which_platform() -> None:
    import sys

    cli = Path(sys.executable).parent / "sandbox-kernels"
    done = subprocess.run([str(cli), "doctor", "gvisor"], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"reports gVisor's kernel {GVISOR_RELEASE}" in done.stdout, done.stdout
    assert "platform" in done.stdout and "memory snapshots:" in done.stdout, done.stdout
