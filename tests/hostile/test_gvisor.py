"""gVisor: the shared hostile suite on ``sandbox-gvisor``.

The container is the Docker runtime's (same shared directories: ``ipc/`` read-write with
sockets only, ``conf/`` read-only), run by runsc with ``--host-uds=create``: code inside may
create sockets on the mount but not open the host's. The suite's attacks (link swaps through
every shared directory, control sockets, the host's loopback, fork/memory/disk bombs, an
output flood) must hold as they do for Docker.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from helpers.orphans import docker_containers
from hostile.suite import HostileRuntime, HostileSuite

pytestmark = [pytest.mark.hostile, pytest.mark.docker]

KERNEL = "sandbox-gvisor"
STEP_TIMEOUT = 180


def _log_bytes(kernel_id: str) -> int:
    """Size of the container's log files on the host (json-file driver, rotated ones too)."""
    (cid,) = docker_containers(kernel_id)
    path = subprocess.run(["docker", "inspect", "-f", "{{.LogPath}}", cid], capture_output=True,
                          text=True, check=True, timeout=30).stdout.strip()
    directory = os.path.dirname(path)
    return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)
               if f.startswith(os.path.basename(path)))


class TestGVisorHostile(HostileSuite):
    """The shared hostile suite (tests/hostile/suite.py) on the gVisor runtime."""

    @pytest.fixture
    def hostile(self) -> HostileRuntime:
        return HostileRuntime(kernel_name=KERNEL, sandbox_exists=lambda kid: bool(docker_containers(kid)),
                              start_timeout=STEP_TIMEOUT, exec_timeout=STEP_TIMEOUT, flood_bytes=512 << 20,
                              host_output_bytes=_log_bytes)


#: Runs in the kernel: is the host's socket visible on the mount, and does a connect reach it?
CONNECT_HOST_SOCKET = r'''
import os, socket, stat
path = {path!r}
seen = stat.S_ISSOCK(os.lstat(path).st_mode) if os.path.lexists(path) else False
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
try:
    s.connect(path)
    s.sendall(b"hello from the sandbox")
    print(seen, "connected")
except OSError as e:
    print(seen, "errno", e.errno)
'''


async def test_host_sockets_on_the_mount_cannot_be_opened() -> None:
    """runsc runs with ``--host-uds=create``: the kernel creates its own sockets on the ``ipc/``
    mount (the host connects to them), but a socket the host listens on there is out of its
    reach (``all`` or ``open`` would let it connect)."""
    import asyncio
    import socket
    from pathlib import Path

    from lifecycle import run_cell, start

    km, kc = await start(KERNEL, timeout=STEP_TIMEOUT)
    server = socket.socket(socket.AF_UNIX)
    try:
        path = Path(km.provisioner.connection_info["ip"]).parent / "host-service.sock"
        server.bind(str(path))  # the test plays a host service; the provisioner never writes here
        os.chmod(path, 0o777)  # file permissions allow it: only gVisor's policy may refuse
        server.listen(4)
        server.setblocking(False)
        out = await run_cell(kc, CONNECT_HOST_SOCKET.format(path=str(path)), timeout=STEP_TIMEOUT)
        assert out["status"] == "ok", out
        seen, verdict = out["stdout"].split(None, 1)
        # EPERM is gVisor's refusal of a host socket (a missing file would be ENOENT, a
        # permission problem EACCES): the kernel found it and was not allowed to open it.
        assert verdict.strip() == "errno 1", f"the kernel connected to a host socket, or never saw it: {out}"
        await asyncio.sleep(0.5)
        try:
            server.accept()
            raise AssertionError("the host socket accepted a connection from the sandbox")
        except BlockingIOError:
            pass
        print(f"host socket visible in the sandbox: {seen}; connect refused: {verdict.strip()}")
    finally:
        server.close()
        kc.stop_channels()
        await km.shutdown_kernel(now=True)
