"""A real SSH host for the sandbox-ssh runtime: sshd in a network namespace, as user sk-tester.

``ssh_host(directory, tag)`` makes the user (and an authorized key of this run's own), runs
sshd in a network namespace of its own reached over a veth link, points the ``SANDBOX_SSH_*``
variables at it for the duration of the ``with`` block, and afterwards checks that no kernel
directory made meanwhile was left behind (killing what runs from one). Several test runs may
share the user at once: each touches only its own key file and kernel directories.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import subprocess
from collections.abc import Iterator
from pathlib import Path

from helpers.netns import network_namespace
from helpers.sshd import running_sshd
from sandbox_kernels.ssh.keys import generate_keypair, write_private_key

USER = "sk-tester"


def ensure_user(name: str) -> pwd.struct_passwd:
    """Create local user ``name`` (with a home directory) if missing; key logins allowed."""
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", name], check=True)
    # No password, but not locked: sshd refuses locked accounts even for key logins.
    subprocess.run(["usermod", "-p", "*", name], check=True)
    return pwd.getpwnam(name)


def kernel_base() -> Path:
    """Where the runtime makes kernel directories for USER by default."""
    return Path(pwd.getpwnam(USER).pw_dir) / ".cache" / "sandbox-kernels-ssh"


def kernel_dirs(kernel_id: str = "") -> list[Path]:
    """USER's kernel directories (of one kernel, or all)."""
    base = kernel_base()
    return sorted(base.glob(f"{kernel_id}.*" if kernel_id else "*")) if base.is_dir() else []


@contextlib.contextmanager
def ssh_host(directory: Path, tag: str = "ssh") -> Iterator[dict[str, str]]:
    """A real sshd (network namespace ``sk-<tag>``) and the env pointing sandbox-ssh at it.

    Needs root (to add the user and run sshd as it).
    """
    user = ensure_user(USER)
    client = generate_keypair("sk-client")
    key_file = write_private_key(directory / "client_key", client)
    # sshd reads authorized keys as the user: keep them in the user's own ~/.ssh.
    ssh_dir = Path(user.pw_dir) / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    authorized = ssh_dir / f"sandbox-kernels-test-keys-{os.getpid()}-{tag}"
    authorized.write_text(client.public_line + "\n")
    for path in (ssh_dir, authorized):
        os.chown(path, user.pw_uid, user.pw_gid)
    extra = [f"AuthorizedKeysFile {authorized}"]
    before = set(kernel_dirs())
    with network_namespace(tag) as ns, running_sshd(directory / "server", user=USER, client_key=client,
                                                   extra_config=extra, host=ns.guest_ip,
                                                   netns=ns.name) as server:
        known_hosts = directory / "known_hosts"
        known_hosts.write_text(f"[{server.host}]:{server.port} {server.host_public_line}\n")
        addresses = subprocess.run(["ip", "netns", "exec", ns.name, "ip", "-4", "addr"],
                                   capture_output=True, text=True).stdout
        assert addresses.count("inet ") == 2  # lo and the veth end only
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
            authorized.unlink(missing_ok=True)
    leftovers = sorted(set(kernel_dirs()) - before)
    for path in leftovers:
        subprocess.run(["pkill", "-KILL", "-u", USER, "-f", str(path)], capture_output=True)
        subprocess.run(["rm", "-rf", "--", str(path)], capture_output=True)
    assert not leftovers, f"kernel directories left on the host: {leftovers}"
