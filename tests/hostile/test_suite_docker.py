"""Docker runs the shared hostile suite."""

from __future__ import annotations

import os
import subprocess

import pytest

from hostile.suite import HostileRuntime, HostileSuite

pytestmark = [pytest.mark.hostile, pytest.mark.docker]


def _containers(kernel_id: str) -> list[str]:
    out = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label=sandbox-kernels.kernel-id={kernel_id}"],
        capture_output=True, text=True, check=True, timeout=30)
    return out.stdout.split()


def _log_bytes(kernel_id: str) -> int:
    """Size of the container's log files on the host (json-file driver, rotated ones too)."""
    (cid,) = _containers(kernel_id)
    path = subprocess.run(["docker", "inspect", "-f", "{{.LogPath}}", cid], capture_output=True,
                          text=True, check=True, timeout=30).stdout.strip()
    directory = os.path.dirname(path)
    return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)
               if f.startswith(os.path.basename(path)))


class TestDockerHostile(HostileSuite):
    @pytest.fixture
    def hostile(self) -> HostileRuntime:
        return HostileRuntime(kernel_name="sandbox-docker", sandbox_exists=lambda kid: bool(_containers(kid)),
                              start_timeout=120, exec_timeout=120, flood_bytes=1 << 30,
                              host_output_bytes=_log_bytes)
