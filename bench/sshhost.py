"""A real OpenSSH server on 127.0.0.1 for the ``sandbox-ssh`` kernel, set up as the tests do.

It reuses the tests' ``running_sshd`` helper (its own host key, key-only login, a free port)
with a login user of its own (``sk-bench``, not the tests' ``sk-tester``, so a test session that
kills its user's processes on this machine does not kill the benchmark's kernels).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from sandbox_kernels.ssh.keys import generate_keypair, write_private_key

USER = "sk-bench"
REMOTE_ROOT = Path(f"/tmp/sandbox-kernels-{USER}")
REPO = Path(__file__).resolve().parent.parent
REMOTE_PYTHON = "/usr/bin/python3"


class Unavailable(Exception):
    """The SSH host cannot be set up here; the message says why."""


def check() -> None:
    """Raise :class:`Unavailable` unless an SSH host can be set up on this machine."""
    if os.geteuid() != 0:
        raise Unavailable("needs root (adds user sk-bench and runs sshd as it)")
    if not os.path.exists("/usr/sbin/sshd"):
        raise Unavailable("no /usr/sbin/sshd (apt-get install openssh-server)")
    probe = subprocess.run([REMOTE_PYTHON, "-c", "import ipykernel"], capture_output=True)
    if probe.returncode != 0:
        raise Unavailable(f"{REMOTE_PYTHON} has no ipykernel (apt-get install python3-ipykernel)")


def _sshd_helper() -> ModuleType:
    path = REPO / "tests" / "helpers" / "sshd.py"
    spec = importlib.util.spec_from_file_location("_bench_sshd_helper", path)
    if spec is None or spec.loader is None:
        raise Unavailable(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def _ensure_user() -> pwd.struct_passwd:
    try:
        pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", USER], check=True)
    # No password, but not locked: sshd refuses locked accounts even for key logins.
    subprocess.run(["usermod", "-p", "*", USER], check=True)
    return pwd.getpwnam(USER)


@contextlib.contextmanager
def ssh_host(workdir: Path) -> Iterator[dict[str, str]]:
    """Run sshd for the ``with`` block with ``SANDBOX_SSH_*`` pointing at it; stop it after.

    Yields:
        The environment variables set (they are removed again on exit).

    Raises:
        Unavailable: not root, or sshd/python3-ipykernel missing.
    """
    check()
    helper = _sshd_helper()
    user = _ensure_user()
    workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    client = generate_keypair("sk-bench-client")
    key_file = write_private_key(workdir / "client_key", client)
    ssh_dir = Path(user.pw_dir) / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    authorized = ssh_dir / "sandbox-kernels-bench-keys"
    authorized.write_text(client.public_line + "\n")
    for path in (ssh_dir, authorized):
        os.chown(path, user.pw_uid, user.pw_gid)
    extra = [f"AuthorizedKeysFile {authorized}"]
    with helper.running_sshd(workdir / "server", user=USER, client_key=client, extra_config=extra) as server:
        known_hosts = workdir / "known_hosts"
        known_hosts.write_text(f"[{server.host}]:{server.port} {server.host_public_line}\n")
        env = {
            "SANDBOX_SSH_HOST": server.host, "SANDBOX_SSH_PORT": str(server.port),
            "SANDBOX_SSH_USER": USER, "SANDBOX_SSH_KEY_FILE": str(key_file),
            "SANDBOX_SSH_KNOWN_HOSTS": str(known_hosts), "SANDBOX_SSH_PYTHON": REMOTE_PYTHON,
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
            shutil.rmtree(REMOTE_ROOT, ignore_errors=True)
