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
