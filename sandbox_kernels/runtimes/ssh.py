"""SSH host runtime: the kernel runs on any machine you can SSH to (kernel name ``sandbox-ssh``).

A cloud VM, a Codespace, a lab server: the kernel starts over SSH exec with its argv quoted,
binds its ports on the remote's 127.0.0.1, and is reached through the same in-process tunnel
as the VM runtime. The host key must already be trusted (``known_hosts``) or pinned
(``host_key``); unknown keys are refused.
"""

from __future__ import annotations

import getpass
import os
from typing import Any

from traitlets import Int, Unicode, validate

from ..aio import to_thread
from ..errors import SandboxConfigError, SandboxError
from ..settings import check_name, env_default
from ..ssh.keys import load_private_key
from ..ssh.tunnel import SSHTunnel
from .tunnelled import TunnelledProvisioner


class SSHHostProvisioner(TunnelledProvisioner):
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
                          help="Remote directory for kernel files (default /tmp/sandbox-kernels-<user>).")
    connect_timeout = Int(15, config=True, help="Seconds for the SSH connection.")

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
        """``<remote_root>/<kernel id>``."""
        root = self.remote_root or f"/tmp/sandbox-kernels-{self._user}"
        return f"{root.rstrip('/')}/{self.kernel_id}"

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
        """Connect; the remote directory is made when the kernel starts."""
        await self._tunnel_ready()

    async def destroy_sandbox(self) -> None:
        """Kill the kernel's process group, remove the remote directory, close the tunnel."""
        if self.tunnel is not None:
            try:
                if self.pid is not None:
                    await to_thread(self.tunnel.signal, self.pid, 9, 15)
                await to_thread(self.tunnel.run, ["rm", "-rf", self.remote_dir()], None, 30)
            except SandboxError as e:
                self.log.warning("Kernel %s: could not clean up on %s: %s", self.kernel_id, self.host, e)
        self.pid = None
        await self.close_tunnel()
