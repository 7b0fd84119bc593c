"""The Docker runtime against the real Docker engine."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest

from lifecycle import LifecycleSuite, Runtime, run_cell, start

pytestmark = pytest.mark.docker


def _containers(kernel_id: str) -> list[str]:
    out = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label=sandbox-kernels.kernel-id={kernel_id}"],
        capture_output=True, text=True, check=True, timeout=30,
    )
    return out.stdout.split()


def _remove(kernel_id: str) -> None:
    for cid in _containers(kernel_id):
        subprocess.run(["docker", "rm", "-f", cid], check=True, capture_output=True, timeout=60)


DOCKER = Runtime(
    kernel_name="sandbox-docker",
    sandbox_exists=lambda kid: bool(_containers(kid)),
    destroy_externally=_remove,
    bad_settings=[
        ({"image": "sandbox-kernels/no-such-image:1"}, "image"),
        ({"memory": "lots"}, "memory"),
        ({"memory": "-5g"}, "memory"),
        ({"cpus": -2}, "cpus"),
        ({"colour": "blue"}, "colour"),
        ({"pids_limit": "many"}, "pids_limit"),
    ],
    start_timeout=60,
)


class TestDockerLifecycle(LifecycleSuite):
    @pytest.fixture
    def runtime(self) -> Runtime:
        return DOCKER


def _inspect(kernel_id: str) -> dict[str, Any]:
    import json

    (cid,) = _containers(kernel_id)
    out = subprocess.run(["docker", "inspect", cid], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)[0]


async def test_container_is_locked_down() -> None:
    km, kc = await start("sandbox-docker", timeout=60)
    try:
        info = _inspect(km.kernel_id)
        host = info["HostConfig"]
        assert host["NetworkMode"] == "none"
        assert host["CapDrop"] == ["ALL"]
        assert "no-new-privileges" in host["SecurityOpt"]
        assert host["Memory"] == 1024**3 and host["PidsLimit"] == 256
        assert info["Config"]["Labels"]["sandbox-kernels.kernel-id"] == km.kernel_id
        out = await run_cell(kc, (
            "import socket, os\n"
            "ifaces = sorted(n for _, n in socket.if_nameindex())\n"
            "caps = [l for l in open('/proc/self/status') if l.startswith(('CapEff', 'NoNewPrivs'))]\n"
            "print(ifaces, os.getuid(), ''.join(caps).split())"
        ))
        assert out["stdout"].startswith("['lo'] 1000"), out
        assert "0000000000000000" in out["stdout"] and "NoNewPrivs:', '1" in out["stdout"]
        # No route anywhere: an outbound connection has nowhere to go (nothing is sent to
        # find out; tests/hostile/ tries the host's loopback).
        net = await run_cell(kc, "print(open('/proc/net/route').read().splitlines()[1:])")
        assert net["stdout"] == "[]\n", net
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)


async def test_read_only_root_keeps_workdir_writable(kernelspec_dir: Any) -> None:
    from jupyter_client.kernelspec import KernelSpecManager

    ksm = KernelSpecManager(kernel_dirs=[str(kernelspec_dir("sandbox-docker", name="ro", read_only=True))])
    km, kc = await start("ro", ksm=ksm, timeout=60)
    try:
        out = await run_cell(kc, (
            "import os\nopen('note.txt', 'w').write('ok')\n"
            "try:\n    open('/etc/x', 'w')\nexcept OSError as e:\n    print('ro', e.errno)\n"
            "print(os.getcwd(), open('note.txt').read())"
        ))
        assert out["stdout"] == "ro 30\n/home/executor ok\n", out
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)
    assert not _containers(km.kernel_id)


async def test_engine_restart_is_survived() -> None:
    """dockerd stops (taking the container down) and starts again: the kernel is reported dead
    while the engine is away, and the restarter brings it back in the same container.

    Runs before the Kubernetes tests (file order): their test cluster's pods live on this
    engine and would not survive the restart.
    """
    import os
    import signal
    import time
    from pathlib import Path

    from jupyter_client.ioloop.restarter import AsyncIOLoopKernelRestarter

    from helpers.kernels import wait_until

    km, kc = await start("sandbox-docker", timeout=60)
    restarts: list[str] = []
    restarter = AsyncIOLoopKernelRestarter(kernel_manager=km, time_to_dead=1.0, parent=km)
    restarter.add_callback(lambda: restarts.append("restart"), "restart")
    try:
        await run_cell(kc, "before = 1")
        (cid,) = _containers(km.kernel_id)
        pid = int(subprocess.run(["pgrep", "-xo", "dockerd"], capture_output=True, text=True,
                                 check=True).stdout.split()[0])
        script = Path(__file__).resolve().parents[1] / "scripts" / "daemons.sh"
        try:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 90
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.5)
            assert not Path(f"/proc/{pid}").exists(), "dockerd did not stop"
            assert await km.provisioner.poll() is not None, "a kernel whose engine is gone must poll dead"
        finally:  # whatever happened, the engine comes back for the tests that follow
            subprocess.run(["bash", str(script)], check=True, capture_output=True, timeout=120)
        restarter.start()

        async def restarted() -> bool:
            return bool(restarts)

        assert await wait_until(restarted, timeout=60), "no auto-restart after the engine came back"
        await kc.wait_for_ready(timeout=120)
        out = await run_cell(kc, "print('before' in globals())")
        assert out["stdout"] == "False\n"
        assert _containers(km.kernel_id) == [cid], "the restart reuses the container"
    finally:
        restarter.stop()
        kc.stop_channels()
        await km.shutdown_kernel(now=True)
