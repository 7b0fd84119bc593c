"""SSH host runtime: the kernel runs on any machine you can SSH to (kernel name ``sandbox-ssh``).

A cloud VM, a Codespace, a lab server: the kernel starts over SSH exec with its argv quoted,
binds its ports on the remote's 127.0.0.1, and is reached through the same in-process tunnel
as the VM runtime. The host key must already be trusted (``known_hosts``) or pinned
(``host_key``); unknown keys are refused.

The kernel's files (connection file, log, exit status) live in a fresh directory that only the
login user can change, made on the host under ``~/.cache/sandbox-kernels-ssh`` (or an admin's
``remote_root``, checked component by component): other users of a shared host cannot plant
or redirect them (see :mod:`sandbox_kernels.runtimes.ssh.private_dir`).
"""

from __future__ import annotations

import getpass
import os
from typing import Any

from traitlets import Int, Unicode, validate

from ...aio import to_thread
from ...errors import SandboxConfigError, SandboxError
from ...settings import check_name, env_default
from ...remote.ssh_provisioner import SSHKernelProvisioner
from ...ssh.keys import load_private_key
from ...ssh.tunnel import SSHTunnel
from .private_dir import DEFAULT_BASE, make_private_dir

#: Stands in for the kernel directory in the kernel's command until the directory is made
#: (its name is chosen on the host, after the command is built).
_PENDING_DIR = "/nonexistent/sandbox-kernels-dir-not-made-yet"


class SSHHostProvisioner(SSHKernelProvisioner):
    """Runs the kernel on a remote host over SSH."""

    runtime = "ssh"
    kernel_name = "sandbox-ssh"

    host = Unicode("", config=True, help="The SSH host (name or address). Env: SANDBOX_SSH_HOST.")
    _host_default = env_default("host", "SANDBOX_SSH_HOST")
    port = Int(22, config=True, help="The SSH port. Env: SANDBOX_SSH_PORT.")
    _port_default = env_default("port", "SANDBOX_SSH_PORT")
    user = Unicode("", config=True, help="Login user (default: yours). Env: SANDBOX_SSH_USER.")
    _user_default = env_default("user", "SANDBOX_SSH_USER")
    key_file = Unicode("", config=True, help="Private key file (0600). Env: SANDBOX_SSH_KEY_FILE.")
    _key_file_default = env_default("key_file", "SANDBOX_SSH_KEY_FILE")
    known_hosts = Unicode("", config=True,
                          help="known_hosts file holding the host's key (default ~/.ssh/known_hosts). "
                          "Env: SANDBOX_SSH_KNOWN_HOSTS.")
    _known_hosts_default = env_default("known_hosts", "SANDBOX_SSH_KNOWN_HOSTS")
    host_key = Unicode("", config=True,
                       help="Pin the host key directly ('ssh-ed25519 AAAA...'), instead of known_hosts.")
    remote_python = Unicode("python3", config=True,
                            help="Python with ipykernel on the host. Env: SANDBOX_SSH_PYTHON.")
    _remote_python_default = env_default("remote_python", "SANDBOX_SSH_PYTHON")
    remote_root = Unicode("", config=True,
                          help="Remote base directory for kernel directories (default "
                          f"{DEFAULT_BASE}). Every component must be changeable only by root or "
                          "the login user (a root-owned sticky directory like /tmp is allowed).").tag(
                              widen="admin")
    connect_timeout = Int(15, config=True, help="Seconds for the SSH connection.")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._remote_dir: str | None = None

    @validate("remote_root")
    def _check_remote_root(self, proposal: dict[str, Any]) -> str:
        value = proposal["value"]
        if value and (not (value.startswith("/") or value.startswith("~/"))
                      or any(c in value for c in "\0\n")):
            raise SandboxConfigError(
                f"remote_root={value!r} must be an absolute path or one under ~/ (one line).")
        return str(value)

    @validate("port")
    def _check_port(self, proposal: dict[str, Any]) -> int:
        if not 1 <= proposal["value"] <= 65535:
            raise SandboxConfigError(f"port={proposal['value']} is not a TCP port (1-65535).")
        return int(proposal["value"])

    def validate_settings(self) -> None:
        """The host, key and a way to trust the host key are required."""
        super().validate_settings()
        if not self.host:
            raise SandboxConfigError(
                "host is not set: put it in the kernelspec config ('host') or SANDBOX_SSH_HOST.")
        if any(c.isspace() for c in self.host) or self.host.startswith("-"):
            raise SandboxConfigError(f"host={self.host!r} is not a host name or address.")
        if not self.key_file:
            raise SandboxConfigError(
                "key_file is not set: point it (or SANDBOX_SSH_KEY_FILE) at a private key file.")
        check_name(self._user, "user")
        if not self.host_key and not os.path.isfile(self._known_hosts):
            raise SandboxConfigError(
                f"known_hosts={self._known_hosts!r} does not exist, and no host_key is pinned: "
                f"add the host with `ssh-keyscan -p {self.port} {self.host} >> ~/.ssh/known_hosts` "
                f"after checking its fingerprint, or set host_key.")
        if not self.remote_python or any(c.isspace() for c in self.remote_python):
            raise SandboxConfigError(f"remote_python={self.remote_python!r} must be one program path.")

    @property
    def _user(self) -> str:
        return self.user or getpass.getuser()

    @property
    def _known_hosts(self) -> str:
        return self.known_hosts or os.path.expanduser("~/.ssh/known_hosts")

    def remote_dir(self) -> str:
        """``<remote_root>/<kernel id>.<random>``, made by :meth:`prepare_remote_dir`."""
        return self._remote_dir or _PENDING_DIR

    async def prepare_remote_dir(self, tunnel: SSHTunnel) -> None:
        """Make the kernel's private directory on the host once (kept across restarts).

        Raises:
            SandboxConfigError: ``remote_root`` (or ``~/.cache/sandbox-kernels-ssh``) can be
                changed by another user of the host; the message names it.
        """
        if self._remote_dir is not None:
            return
        base = self.remote_root or DEFAULT_BASE
        setting = (f"remote_root={self.remote_root!r}" if self.remote_root
                   else f"the default remote_root ({DEFAULT_BASE})")
        self._remote_dir = await to_thread(make_private_dir, tunnel, self.remote_python, base, self.kernel_id,
                                           f"{setting} on {self.host}", self.connect_timeout * 2)

    async def start_kernel(self, cmd: list[str], env: dict[str, str]) -> None:
        """Make the kernel directory first, then name it in the kernel's command."""
        await self.prepare_remote_dir(await self.tunnel_ready())
        pending = f"{_PENDING_DIR}/connection.json"
        await super().start_kernel([self.sandbox_connection_file() if a == pending else a for a in cmd], env)

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        """Run the configured remote Python instead of the kernelspec's ``python3``."""
        kwargs = await super().pre_launch(**kwargs)
        kwargs["cmd"][0] = self.remote_python
        return kwargs

    async def open_tunnel(self) -> SSHTunnel:
        """Connect with the configured key, pinning the host key."""
        pkey = await to_thread(load_private_key, os.path.expanduser(self.key_file))
        pins: dict[str, Any] = {"host_key": self.host_key} if self.host_key else {
            "known_hosts": self._known_hosts}
        tunnel = SSHTunnel(self.host, self.port, self._user, pkey, connect_timeout=self.connect_timeout,
                           logger=self.log, **pins)
        try:
            await to_thread(tunnel.ensure_connected, self.connect_timeout)
        except BaseException:
            await to_thread(tunnel.close)
            raise
        return tunnel

    async def create_sandbox(self) -> None:
        """Connect and make the kernel's private directory."""
        await self.prepare_remote_dir(await self.tunnel_ready())

    async def destroy_sandbox(self) -> None:
        """Kill the kernel's process group, remove the remote directory, close the tunnel.

        Connects first if needed (a server that re-attached from ``runtime_state``).
        """
        if self.pid is not None or self._remote_dir is not None:
            try:
                tunnel = await self.tunnel_ready()
                if self.pid is not None:
                    await to_thread(tunnel.signal, self.pid, 9, 15)
                if self._remote_dir is not None:
                    await to_thread(tunnel.run, ["rm", "-rf", "--", self._remote_dir], None, 30)
            except SandboxError as e:
                self.log.warning("Kernel %s: could not clean up on %s: %s", self.kernel_id, self.host, e)
        self.pid = None
        self._remote_dir = None
        await self.close_tunnel()

    def runtime_state(self) -> dict[str, Any]:
        """Also the kernel directory the host chose (for re-attaching and clean-up)."""
        return {**super().runtime_state(), "remote_dir": self._remote_dir}

    def load_runtime_state(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`runtime_state`."""
        super().load_runtime_state(state)
        remote_dir = state.get("remote_dir")
        self._remote_dir = remote_dir if isinstance(remote_dir, str) and remote_dir.startswith("/") else None
