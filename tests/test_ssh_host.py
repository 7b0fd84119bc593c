"""The SSH host runtime against a real OpenSSH server with its own host key and key-only auth."""

from __future__ import annotations

import os
import pwd
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest

from helpers.netns import network_namespace
from helpers.sshd import running_sshd
from lifecycle import LifecycleSuite, Runtime, run_cell, start
from sandbox_kernels.ssh.keys import generate_keypair, write_private_key

pytestmark = pytest.mark.ssh

USER = "sk-tester"
REMOTE_ROOT = f"/tmp/sandbox-kernels-{USER}"


def _ensure_user() -> None:
    try:
        pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", USER], check=True)
    # No password, but not locked: sshd refuses locked accounts even for key logins.
    subprocess.run(["usermod", "-p", "*", USER], check=True)


@pytest.fixture(scope="module")
def ssh_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A real sshd on 127.0.0.1 and the env that points the sandbox-ssh kernelspec at it."""
    if os.geteuid() != 0:
        pytest.skip("needs root to add the test user and run sshd as it")
    _ensure_user()
    base = tmp_path_factory.mktemp("sshd")
    client = generate_keypair("sk-client")
    key_file = write_private_key(base / "client_key", client)
    # sshd reads authorized keys as the user: keep them in the user's own ~/.ssh.
    user = pwd.getpwnam(USER)
    ssh_dir = Path(user.pw_dir) / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    authorized = ssh_dir / "sandbox-kernels-test-keys"
    authorized.write_text(client.public_line + "\n")
    for path in (ssh_dir, authorized):
        os.chown(path, user.pw_uid, user.pw_gid)
    extra = [f"AuthorizedKeysFile {authorized}"]
    # The "remote host" lives in its own network namespace, reached over a veth link.
    with network_namespace("ssh") as ns, running_sshd(base / "server", user=USER, client_key=client,
                                                      extra_config=extra, host=ns.guest_ip,
                                                      netns=ns.name) as server:
        known_hosts = base / "known_hosts"
        known_hosts.write_text(f"[{server.host}]:{server.port} {server.host_public_line}\n")
        assert subprocess.run(["ip", "netns", "exec", ns.name, "ip", "-4", "addr"], capture_output=True,
                              text=True).stdout.count("inet ") == 2  # lo and the veth end only
        env = {
            "SANDBOX_SSH_HOST": server.host, "SANDBOX_SSH_PORT": str(server.port),
            "SANDBOX_SSH_USER": USER, "SANDBOX_SSH_KEY_FILE": str(key_file),
            "SANDBOX_SSH_KNOWN_HOSTS": str(known_hosts), "SANDBOX_SSH_PYTHON": "/usr/bin/python3",
        }
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            yield env
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            subprocess.run(["pkill", "-KILL", "-u", USER], capture_output=True)
    leftovers = list(Path(REMOTE_ROOT).glob("*")) if Path(REMOTE_ROOT).exists() else []
    assert not leftovers, f"kernel directories left on the host: {leftovers}"


def _exists(kernel_id: str) -> bool:
    return (Path(REMOTE_ROOT) / kernel_id).exists()


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
