"""The provisioner base of runtimes whose sandbox is reached over SSH (VM, SSH host).

One in-process :class:`~sandbox_kernels.ssh.tunnel.SSHTunnel` per sandbox carries both the
kernel's commands (:class:`~.ssh.SSHShell`) and its forwards (:class:`~.ssh.SSHForwarder`).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

from ..aio import to_thread
from ..ssh.tunnel import SSHTunnel
from .kernel import RemoteKernel
from .provisioner import RemoteKernelProvisioner
from .ssh import SSHForwarder, SSHShell


class SSHKernelProvisioner(RemoteKernelProvisioner):
    """Base of runtimes whose kernel is reached through an SSH tunnel."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._tunnel: SSHTunnel | None = None

    @abstractmethod
    async def open_tunnel(self) -> SSHTunnel:
        """Return a connected tunnel to the sandbox (called once the sandbox exists)."""

    @property
    def tunnel(self) -> SSHTunnel | None:
        """The connection to the sandbox, if open. Setting a new one drops the held kernel
        (its shell was the old connection's); its state stays."""
        return self._tunnel

    @tunnel.setter
    def tunnel(self, tunnel: SSHTunnel | None) -> None:
        if tunnel is not self._tunnel and self.kernel is not None:
            self.kernel.close_watch()
            self.kernel = None
        self._tunnel = tunnel

    async def tunnel_ready(self) -> SSHTunnel:
        """The tunnel, opened by :meth:`open_tunnel` if none is."""
        if self._tunnel is None:
            self.tunnel = await self.open_tunnel()
        assert self._tunnel is not None
        return self._tunnel

    async def connect_kernel(self) -> RemoteKernel:
        """A kernel over the tunnel's shell and forwards."""
        tunnel = await self.tunnel_ready()
        return RemoteKernel(SSHShell(tunnel, self.log), SSHForwarder(tunnel), remote_dir=self.remote_dir(),
                            cwd=self.remote_cwd(), preload=self.preload_kernels(),
                            launch_timeout=self.launch_timeout, log=self.log,
                            prepare_dir=lambda: self.prepare_remote_dir(tunnel), state=self.kernel_state)

    async def prepare_remote_dir(self, tunnel: SSHTunnel) -> None:
        """Make sure the kernel directory exists, private to the login user, before a start.

        Called before the kernel (or its preloader) starts. The default makes it with
        ``mkdir -p -m 700``: right in a machine of its own (a VM), where no other user can
        reach the parents. Hosts shared with other users override it.
        """
        await to_thread(SSHShell(tunnel, self.log).run, ["mkdir", "-p", "-m", "700", self.remote_dir()], None, 30)

    async def close_tunnel(self) -> None:
        """Close the kernel's watch, every forward (listeners included) and the connection."""
        await self.close_kernel()
        tunnel, self._tunnel = self._tunnel, None
        if tunnel is not None:
            await to_thread(tunnel.close)
