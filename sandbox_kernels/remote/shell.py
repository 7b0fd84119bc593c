"""The two protocols a :class:`~.kernel.RemoteKernel` is driven through.

A :class:`Shell` is one sandbox's command channel: over the SSH tunnel
(:class:`sandbox_kernels.remote.ssh.SSHShell`) or over Kubernetes exec
(:class:`sandbox_kernels.runtimes.k8s.process.PodProcess`). A :class:`Forwarder` carries the
client's local sockets to ports in the sandbox: SSH channels
(:class:`sandbox_kernels.remote.ssh.SSHForwarder`) or the Kubernetes port-forward
(:class:`sandbox_kernels.runtimes.k8s.forward.PortForwarder`).

Every method blocks; async callers use ``to_thread``. Both protocols are structural
(``typing.Protocol``): the unit tests' fakes implement them without inheriting.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence
from typing import Protocol

from ..ssh.runner import CommandResult
from ..ssh.status import ProcessStatus

__all__ = ["CommandResult", "Forwarder", "ProcessStatus", "Shell", "Watch"]


class Watch(Protocol):
    """A push-style watch of one detached process (see :meth:`Shell.watch`)."""

    @property
    def broken(self) -> bool:
        """The channel ended without a report (connection lost): open a new watch."""

    def status(self) -> ProcessStatus | None:
        """None while the process runs (or the watch is broken), else how it ended. Never
        blocks: it only looks at what has arrived."""

    def close(self) -> None:
        """Stop watching."""


class Shell(Protocol):
    """Run commands, write files, start, watch and signal detached processes in one sandbox.

    Every value read back is bounded (``max_output``, the status words); commands are argv
    lists, never shell text built from values (see :mod:`.scripts`).
    """

    #: Whether the channel is lost for good (an SSH tunnel that stopped reconnecting).
    gave_up: bool

    def run(self, argv: Sequence[str], input: bytes | None = None, timeout: float = 60.0,
            max_output: int = 64 << 20) -> CommandResult:
        """Run ``argv``; its exit code, stdout and stderr (at most ``max_output`` bytes).

        Raises:
            SandboxConfigError: ``argv`` is not a non-empty list of strings.
            SandboxTimeout: it ran past ``timeout``.
            SandboxConnectionError: the channel failed.
            SandboxError: more than ``max_output`` bytes of output.
        """

    def write_file(self, path: str, data: bytes, mode: int = 0o600, timeout: float = 60.0) -> None:
        """Write ``path`` atomically with ``mode`` (a 0600 temporary file, then renamed).

        Raises:
            SandboxError: the write failed.
        """

    def start_detached(self, argv: Sequence[str], log_path: str, env: Mapping[str, str] | None = None,
                       cwd: str | None = None, timeout: float = 30.0) -> int:
        """Start ``argv`` in a new session, output to ``log_path``, exit status recorded in
        ``<log_path>.exit``; the environment never appears where other users could read it.

        Returns:
            The pid of the wrapper, which leads the process group.

        Raises:
            SandboxConfigError: a bad command, environment name or path.
            SandboxStartError: the process could not be started.
        """

    def status(self, pid: int, log_path: str, timeout: float = 30.0) -> ProcessStatus:
        """Running, exited (with its code) or gone.

        Raises:
            SandboxError: the check itself failed.
        """

    def watch(self, pid: int, log_path: str, timeout: float = 30.0) -> Watch | None:
        """A watch that reports when ``pid`` ends, or None if this shell has none (the
        caller then asks :meth:`status`).

        Raises:
            SandboxConnectionError, SandboxTimeout: the watch could not be opened.
        """

    def signal(self, pid: int, signum: int, timeout: float = 30.0) -> bool:
        """Send ``signum`` (by name) to the process group led by ``pid``.

        Returns:
            False if no such process runs (its group is signalled all the same).

        Raises:
            SandboxConfigError: ``pid`` is not above 1, or ``signum`` is not a signal.
            SandboxNotFound: the sandbox itself is gone.
            SandboxError: ``kill`` failed for another reason.
        """

    def tail(self, path: str, max_bytes: int) -> str:
        """At most the last ``max_bytes`` of ``path`` as text; a message in brackets if it
        cannot be read (never raises: it goes into error messages)."""


class Forwarder(Protocol):
    """Local client sockets carried to ports in the sandbox; the local ends never change."""

    @property
    def forwards(self) -> Mapping[int, object]:
        """The open forwards, by local port."""

    def forward(self, local_port: int, remote_port: int, sock: socket.socket | None = None) -> int:
        """Listen on ``sock`` (taken over) or 127.0.0.1:``local_port`` and carry each
        connection to ``remote_port`` in the sandbox.

        Raises:
            SandboxConnectionError: the forwarder is closed, or the port cannot be bound.
        """

    def repoint(self, local_port: int, remote_port: int) -> None:
        """Send ``local_port``'s connections to ``remote_port`` from now on (same listener),
        resuming it if paused; connections still carried to the old port are closed.

        Raises:
            SandboxNotFound: no forward listens on ``local_port``.
        """

    def pause(self) -> None:
        """The remote ends are going away: close carried connections, and hold (or let fail)
        new ones until :meth:`repoint`."""

    def drop_connections(self) -> None:
        """Close every carried connection; listeners stay, clients reconnect."""

    def close(self) -> None:
        """Close listeners and connections; idempotent."""
