"""The SSH host runtime against a real OpenSSH server with its own host key and key-only auth."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest

from helpers.ssh_host import USER, kernel_dirs, ssh_host as running_ssh_host
from lifecycle import LifecycleSuite, Runtime, run_cell, start
from sandbox_kernels.ssh.keys import generate_keypair

pytestmark = pytest.mark.ssh


@pytest.fixture(scope="module")
def ssh_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A real sshd in a network namespace and the env that points the sandbox-ssh kernelspec at it."""
    if os.geteuid() != 0:
        pytest.skip("needs root to add the test user and run sshd as it")
    with running_ssh_host(tmp_path_factory.mktemp("sshd")) as env:
        yield env


def _exists(kernel_id: str) -> bool:
    return bool(kernel_dirs(kernel_id))


def _kill(kernel_id: str) -> None:
    subprocess.run(["pkill", "-KILL", "-u", USER, "-f", kernel_id], capture_output=True)


class TestSSHHostLifecycle(LifecycleSuite):
    @pytest.fixture
    def runtime(self, ssh_host: dict[str, str]) -> Runtime:
        return Runtime(
            kernel_name="sandbox-ssh",
            sandbox_exists=_exists,
            destroy_externally=_kill,
            bad_settings=[({"port": 70000}, "port"), ({"host": "-oProxyCommand=x"}, "host"),
                          ({"known_hosts": "/nonexistent", "host_key": ""}, "known_hosts"),
                          ({"remote_python": "python3; reboot"}, "remote_python")],
            start_timeout=60,
        )

    async def test_runs_in_the_sandbox(self, kernel: Any, runtime: Runtime) -> None:
        km, kc = kernel
        out = await run_cell(kc, "import getpass; print(getpass.getuser())")
        assert out["stdout"] == f"{USER}\n"


async def test_unknown_host_key_refused(ssh_host: dict[str, str], kernelspec_dir: Any, tmp_path: Path) -> None:
    from jupyter_client.kernelspec import KernelSpecManager

    stranger = generate_keypair("stranger")
    kdir = kernelspec_dir("sandbox-ssh", name="wrongkey", host_key=stranger.public_line)
    ksm = KernelSpecManager(kernel_dirs=[str(kdir)])
    with pytest.raises(Exception) as info:
        await start("wrongkey", ksm=ksm, timeout=30)
    text = str(info.value)
    assert "host key" in text.lower() and stranger.fingerprint in text, text


@pytest.mark.slow
async def test_start_stop_cycles_leave_nothing(ssh_host: dict[str, str]) -> None:
    """Load: repeated start/stop on the SSH host (``make soak``: 50) leaves nothing behind."""
    from cycles import cycles_leave_nothing

    await cycles_leave_nothing("sandbox-ssh", int(os.environ.get("SANDBOX_KERNELS_SOAK_SSH_CYCLES", 20)), 60)
