"""The provisioner base of runtimes whose kernel is reached through a Shell and a Forwarder.

A subclass creates the sandbox and says how to reach it (:meth:`connect_kernel` returns a
:class:`~.kernel.RemoteKernel` over its shell and forwarder); this base *holds* that kernel
and maps jupyter_client's lifecycle onto it. The client's local ends (unix sockets in the
state directory, or 127.0.0.1 ports) are bound before the kernel starts and kept across
restarts (see :mod:`sandbox_kernels.client_sockets`).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

from ..aio import to_thread
from ..client_sockets import ClientSockets, transport_trait
from ..provisioning.base import SandboxProvisioner
from ..settings import env_default
from .kernel import CHANNELS, KernelState, RemoteKernel


class RemoteKernelProvisioner(SandboxProvisioner):
    """Base of the VM, SSH-host and Kubernetes provisioners: one :class:`RemoteKernel` each."""

    transport = transport_trait()
    _transport_default = env_default("transport", "SANDBOX_KERNELS_TRANSPORT")

    #: Seconds :meth:`stop_kernel` waits for the killed kernel to be gone (0: do not wait).
    stop_wait: float = 0.0

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        #: The kernel's pid, ports and preloader: kept here, shared with :attr:`kernel`.
        self.kernel_state = KernelState()
        #: The remote kernel, once the sandbox can be reached (see :meth:`remote_kernel`).
        self.kernel: RemoteKernel | None = None
        self._sockets: ClientSockets | None = None

    # -- hooks --------------------------------------------------------------------------------

    @abstractmethod
    async def connect_kernel(self) -> RemoteKernel:
        """A :class:`RemoteKernel` over the ready sandbox's shell and forwarder, sharing
        :attr:`kernel_state`. Called from :meth:`remote_kernel` when none is held."""

    @abstractmethod
    def remote_dir(self) -> str:
        """Absolute directory in the sandbox for the kernel's connection file and log."""

    def remote_cwd(self) -> str | None:
        """The kernel's working directory in the sandbox (None: the login directory)."""
        return None

    def preload_kernels(self) -> bool:
        """Whether kernels are forked from a preloaded process (see kernel_preloader.py).

        Only where the whole machine goes with the kernel (a VM): on a shared host the
        preloader would outlive it. Default False.
        """
        return False

    async def sandbox_alive(self) -> bool:
        """Whether the machine itself still runs (a VM's domain); default True."""
        return True

    # -- the kernel ---------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The kernel's pid in the sandbox (leader of its process group), None if none runs."""
        return self.kernel_state.pid

    @pid.setter
    def pid(self, value: int | None) -> None:
        self.kernel_state.pid = value

    async def remote_kernel(self) -> RemoteKernel:
        """The held kernel, made by :meth:`connect_kernel` if there is none yet; its
        directory, working directory and preload choice are refreshed from the hooks."""
        if self.kernel is None:
            self.kernel = await self.connect_kernel()
        kernel = self.kernel
        kernel.remote_dir, kernel.cwd, kernel.preload = self.remote_dir(), self.remote_cwd(), self.preload_kernels()
        kernel.launch_timeout = self.launch_timeout
        return kernel

    @property
    def channel_ports(self) -> dict[str, int]:
        """Channel (``"shell"``, ...) -> the client's local port, from the connection info."""
        return {ch: int(self.connection_info[f"{ch}_port"]) for ch in CHANNELS}

    def client_sockets(self) -> ClientSockets:
        """The client's local ends (bound at :meth:`configure_transport`)."""
        if self._sockets is None:
            self._sockets = ClientSockets(self.transport, self.state_dir)
        return self._sockets

    async def close_kernel(self) -> None:
        """Stop watching the kernel, close the forwards and release the local ends."""
        kernel, self.kernel = self.kernel, None
        if kernel is not None:
            await kernel.close()
        if self._sockets is not None:
            self._sockets.release()
            self._sockets = None

    # -- lifecycle ----------------------------------------------------------------------------

    def configure_transport(self, km: Any) -> None:
        """Unix sockets in the state directory (or TCP on 127.0.0.1, see ``transport``), bound
        now and held for the forwards; a restart keeps them."""
        self.client_sockets().assign(km, self.local_ports)

    def sandbox_connection_file(self) -> str:
        """The connection file lives in the remote kernel directory."""
        return f"{self.remote_dir()}/connection.json"

    async def start_kernel(self, cmd: list[str], env: dict[str, str]) -> None:
        """Start the kernel in the sandbox (detached, or forked from the preloader)."""
        kernel = await self.remote_kernel()
        await kernel.start(cmd, env, self.sandbox_connection_info())

    async def wait_ready(self) -> None:
        """Wait for the kernel's ports, then point the local ends at them."""
        kernel = await self.remote_kernel()
        await kernel.wait_ready(self.channel_ports, self.client_sockets())

    async def connect_claimed(self) -> None:
        """The claimed kernel's ports are known: point the local ends at them, without
        waiting for a connection file (a remote shell less under emulation). The kernel's
        watch opens with the first :meth:`poll`."""
        if not self.kernel_state.ports:
            await self.wait_ready()
            return
        kernel = await self.remote_kernel()
        kernel.set_local_ends(self.channel_ports, self.client_sockets())
        await to_thread(kernel.point_forwards, dict(self.kernel_state.ports))

    async def kernel_exit_code(self) -> int | None:
        """-1 if no kernel is held or the machine stopped; else the kernel's own answer."""
        if self.kernel is None or self.pid is None or not await self.sandbox_alive():
            return -1
        return await self.kernel.exit_code()

    async def signal_kernel(self, signum: int) -> None:
        """Signal the kernel's process group in the sandbox (if the machine still runs)."""
        if self.kernel is not None and self.pid is not None and await self.sandbox_alive():
            await self.kernel.signal(signum)

    async def kill(self, restart: bool = False) -> None:
        """Kill the kernel; before a restart, hold the forwards first."""
        if restart and self.kernel is not None:
            await self.kernel.pause()
        await super().kill(restart)

    async def stop_kernel(self) -> None:
        """Before a restart in the same sandbox: hold the forwards, then kill the kernel."""
        if self.kernel is not None:
            await self.kernel.stop(self.stop_wait)

    async def diagnostics(self) -> str:
        """The kernel log's tail."""
        if self.kernel is None:
            return ""
        tail = await self.kernel.log_tail()
        return f"Kernel log:\n{tail}" if tail.strip() else ""

    def runtime_state(self) -> dict[str, Any]:
        """The kernel's pid, ports and preloader (for re-attaching)."""
        return self.kernel_state.to_dict()

    def load_runtime_state(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`runtime_state`."""
        loaded = KernelState.from_dict(state)
        self.kernel_state.pid, self.kernel_state.ports = loaded.pid, loaded.ports
        self.kernel_state.preloader_pid = loaded.preloader_pid
