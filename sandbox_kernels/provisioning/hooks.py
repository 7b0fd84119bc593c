"""The hooks a runtime fills in, and the defaults of the optional ones.

:class:`~.base.SandboxProvisioner` owns the lifecycle and calls these; a runtime (Docker,
libvirt, Kubernetes, SSH host) subclasses it and implements the five abstract hooks at the
bottom. None of the hooks needs ``super()`` unless its docstring says so.
"""

from __future__ import annotations

import contextlib
import os
import signal
from abc import ABC, abstractmethod
from typing import Any

from ..errors import SandboxError


class RuntimeHooks(ABC):
    """The per-runtime part of a sandbox provisioner."""

    connection_info: Any  # provided by jupyter_client's KernelProvisionerBase

    # -- optional hooks (defaults suit a runtime that forwards TCP ports) --------------------

    def configure_transport(self, km: Any) -> None:
        """Choose the ZMQ transport and address the client side uses.

        Called from :meth:`~.base.SandboxProvisioner.pre_launch` before the connection file is
        written. The default is TCP on 127.0.0.1 (ports forwarded from the sandbox); Docker
        overrides it with ``ipc``.
        """
        km.transport = "tcp"
        km.ip = "127.0.0.1"

    def sandbox_connection_file(self) -> str:
        """Path of the connection file as the kernel inside the sandbox sees it.

        Called from ``pre_launch``, which puts it in the kernel command.
        """
        return "/tmp/sandbox-kernel-connection.json"

    def sandbox_connection_info(self) -> dict[str, Any]:
        """The connection info written for the kernel inside the sandbox (bytes key decoded).

        Called by runtimes from :meth:`start_kernel`.
        """
        info = dict(self.connection_info)
        key = info.get("key", b"")
        info["key"] = key.decode() if isinstance(key, bytes) else key
        info.pop("curve_secretkey", None)
        info.pop("curve_publickey", None)
        return info

    def sandbox_description(self) -> str:
        """One line a person reads about the sandbox (a VM's guest OS); default empty.

        Shown by the snapshot panel's header and the snapshot listing.
        """
        return ""

    def runtime_state(self) -> dict[str, Any]:
        """JSON-able state a re-attaching process needs (container id, ports, ...).

        Called from ``get_provisioner_info``.
        """
        return {}

    def load_runtime_state(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`runtime_state`; called from ``load_provisioner_info``."""

    async def keep_sandbox_on_restart(self) -> bool:
        """Whether a restart reuses the sandbox (default) rather than creating a new one.

        Called from ``cleanup(restart=True)``.
        """
        return True

    async def wait_ready(self) -> None:
        """Wait until the kernel in the sandbox is listening; default returns at once.

        Called from ``launch_kernel`` after :meth:`start_kernel`, within ``launch_timeout``.
        """

    async def diagnostics(self) -> str:
        """Text appended to launch errors (a log tail); default empty.

        Called when ``launch_kernel`` times out; bounded to 10 s, its errors are swallowed.
        """
        return ""

    async def stop_kernel(self) -> None:
        """Make sure the kernel process is gone before a restart in the same sandbox.

        Called from ``cleanup(restart=True)`` when the sandbox is kept.
        """
        with contextlib.suppress(SandboxError):
            await self.signal_kernel(signal.SIGKILL)

    # -- required hooks ------------------------------------------------------------------------

    @abstractmethod
    async def create_sandbox(self) -> None:
        """Create and start the sandbox (container, VM, pod, remote directory).

        Called from ``launch_kernel`` on the first start and after the sandbox was lost.
        Raise :class:`SandboxError` subclasses with actionable messages.
        """

    @abstractmethod
    async def start_kernel(self, cmd: list[str], env: dict[str, str]) -> None:
        """Start the kernel process ``cmd`` with ``env`` inside the ready sandbox.

        Called from ``launch_kernel`` (and ``relaunch_kernel``). The connection file for the
        sandbox side is given by :meth:`sandbox_connection_info` and must be in place before
        the kernel starts.
        """

    @abstractmethod
    async def kernel_exit_code(self) -> int | None:
        """None while the kernel runs, else its exit code (-1 if the sandbox is gone).

        Called from ``poll``; must be cheap (the restarter calls it every few seconds).
        """

    @abstractmethod
    async def signal_kernel(self, signum: int) -> None:
        """Deliver ``signum`` to the kernel process inside the sandbox.

        Called from ``send_signal``, ``kill``, ``terminate`` and :meth:`stop_kernel`.
        """

    async def release_sandbox(self) -> list[int]:
        """Close this process's handles on the sandbox (connections, forwards, engine
        clients) and leave the sandbox and its kernel running, for another process to adopt.

        Called from :meth:`~.base.SandboxProvisioner.detach` (a warm-pool member being
        claimed). Returns descriptors the adopter needs (passed to its :meth:`take_over`).
        Runtimes with pools override it; ``super()`` not needed.
        """
        return []

    def take_over(self, fds: list[int]) -> None:
        """Keep what :meth:`release_sandbox` passed along (a VM slot's lock); the default
        closes them. Called from :meth:`~.base.SandboxProvisioner.adopt`."""
        for fd in fds:
            os.close(fd)

    async def keep_warm(self) -> None:
        """Keep a ready pool member quick to claim (the VM keeps a connection to its sshd
        dialed ahead). Called every second or so by the pool agent; the default does nothing."""

    async def connect_claimed(self) -> None:
        """Connect to the kernel already running in a claimed pool member's sandbox.

        Called from ``launch_kernel`` instead of :meth:`start_kernel`; the default waits as
        for a kernel just started (:meth:`wait_ready`).
        """
        await self.wait_ready()

    async def pool_identity(self) -> dict[str, Any]:
        """What identifies this configuration's images (content or file identity), so a
        rebuilt image makes a new warm pool. Called when a start asks the pool."""
        return {}

    async def memory_held(self) -> int:
        """Host memory the running sandbox holds, in bytes (0 if unknown); for the pool's
        status."""
        return 0

    @abstractmethod
    async def destroy_sandbox(self) -> None:
        """Remove everything created for this kernel; must succeed when partly created.

        Called on shutdown, on launch failure and at interpreter exit. Idempotent.
        """
