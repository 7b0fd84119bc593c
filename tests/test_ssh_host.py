"""The SSH host runtime against a real OpenSSH server with its own host key and key-only auth."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest

from helpers.ssh_host import USER, kernel_dirs, ssh_host as running_ssh_host
from lifecycle import LifecycleSuite, Runtime, run_cell, start, wait_until
from sandbox_kernels.errors import HostKeyMismatch
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
    with pytest.raises(HostKeyMismatch) as info:
        await start("wrongkey", ksm=ksm, timeout=30)
    text = str(info.value)
    assert "host key" in text.lower() and stranger.fingerprint in text, text


async def test_a_reattached_server_cleans_up_the_kernel_directory(ssh_host: dict[str, str]) -> None:
    """The host chose the kernel directory's name: it is in the provisioner info, so a server
    that re-attaches (or reaps) finds and removes it, with the kernel."""
    from jupyter_client.provisioning import KernelProvisionerFactory

    km, kc = await start("sandbox-ssh", timeout=60)
    try:
        info = await km.provisioner.get_provisioner_info()
        [kdir] = kernel_dirs(km.kernel_id)
        assert info["sandbox_state"]["remote_dir"] == str(kdir)
        other = KernelProvisionerFactory.instance().create_provisioner_instance(
            km.kernel_id, km.kernel_spec, parent=None)
        await other.load_provisioner_info(info)
        await other.cleanup(restart=False)
        assert not kdir.exists()
        pid = info["sandbox_state"]["pid"]

        async def kernel_gone() -> bool:
            try:
                return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
            except OSError:
                return True

        assert await wait_until(kernel_gone, timeout=30), "the re-attached clean-up left the kernel running"
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)


@pytest.mark.slow
async def test_start_stop_cycles_leave_nothing(ssh_host: dict[str, str]) -> None:
    """Load: repeated start/stop on the SSH host (``make soak``: 50) leaves nothing behind."""
    from helpers.cycles import cycles_leave_nothing

    await cycles_leave_nothing("sandbox-ssh", int(os.environ.get("SANDBOX_KERNELS_SOAK_SSH_CYCLES", 20)), 60)
