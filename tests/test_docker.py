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
        net = await run_cell(kc, (
            "import socket\ntry:\n"
            "    socket.create_connection(('192.0.2.1', 53), timeout=3); print('connected')\n"
            "except OSError as e:\n    print('blocked', e.errno)"
        ))
        assert net["stdout"].startswith("blocked"), net
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
