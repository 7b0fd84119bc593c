"""The :class:`~.shell.Shell` and :class:`~.shell.Forwarder` of a sandbox reached over SSH.

Both sit on one :class:`~sandbox_kernels.ssh.tunnel.SSHTunnel` (one paramiko transport per
sandbox): commands are exec sessions, forwards are ``direct-tcpip`` channels. A command that
meets a dropped connection waits for the tunnel to reconnect and runs once more; watches,
signals and tails do not wait (their callers treat a failure as "ask again later").
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from ..errors import SandboxConnectionError, SandboxError
from ..ssh.runner import DEFAULT_MAX_OUTPUT, CommandResult
from ..ssh.status import ProcessStatus, ProcessWatch
from ..ssh.tunnel import SSHTunnel

T = TypeVar("T")
#: Seconds a command waits for a dropped connection to come back before it fails.
RECONNECT_WAIT = 60.0


class SSHShell:
    """Commands on the sandbox at the far end of ``tunnel``.

    Args:
        tunnel: the connection (connected on first use).
        logger: where a dropped connection is reported.
    """

    def __init__(self, tunnel: SSHTunnel, logger: logging.Logger | None = None) -> None:
        self.tunnel = tunnel
        self._log = logger or logging.getLogger(__name__)

    @property
    def gave_up(self) -> bool:
        """The tunnel stopped reconnecting (see :attr:`SSHTunnel.gave_up`)."""
        return self.tunnel.gave_up

    @property
    def last_error(self) -> BaseException | None:
        """Why the tunnel is down, if it is."""
        return self.tunnel.last_error

    def call_retrying(self, fn: Callable[..., T], *args: Any) -> T:
        """Call ``fn``; after a dropped connection, wait for the reconnect and call it once more."""
        try:
            return fn(*args)
        except SandboxConnectionError as e:
            self._log.warning("SSH connection to the sandbox dropped (%s); reconnecting", e)
            self.tunnel.ensure_connected(RECONNECT_WAIT)
            return fn(*args)

    def run(self, argv: Sequence[str], input: bytes | None = None, timeout: float = 60.0,
            max_output: int = DEFAULT_MAX_OUTPUT) -> CommandResult:
        """See :meth:`Shell.run`; retried once after a reconnect."""
        return self.call_retrying(self.tunnel.run, argv, input, timeout, max_output)

    def write_file(self, path: str, data: bytes, mode: int = 0o600, timeout: float = 60.0) -> None:
        """See :meth:`Shell.write_file`; retried once after a reconnect."""
        self.call_retrying(self.tunnel.write_file, path, data, mode, timeout)

    def start_detached(self, argv: Sequence[str], log_path: str, env: Mapping[str, str] | None = None,
                       cwd: str | None = None, timeout: float = 30.0) -> int:
        """See :meth:`Shell.start_detached` (the environment travels on stdin); retried once
        after a reconnect."""
        return self.call_retrying(self.tunnel.start_detached, argv, log_path, env, cwd, timeout)

    def status(self, pid: int, log_path: str, timeout: float = 30.0) -> ProcessStatus:
        """See :meth:`Shell.status`; retried once after a reconnect."""
        return self.call_retrying(self.tunnel.process_status, pid, log_path, timeout)

    def watch(self, pid: int, log_path: str, timeout: float = 15.0) -> ProcessWatch:
        """A session that runs while ``pid`` runs (see :class:`ProcessWatch`)."""
        return self.tunnel.watch_process(pid, log_path, timeout)

    def signal(self, pid: int, signum: int, timeout: float = 15.0) -> bool:
        """See :meth:`Shell.signal`."""
        return self.tunnel.signal(pid, signum, timeout)

    def tail(self, path: str, max_bytes: int) -> str:
        """The last ``max_bytes`` of ``path`` (``tail -c``: one endless line is cut too)."""
        try:
            result = self.tunnel.run(["tail", "-c", str(max_bytes), "--", path], None, 15, max_bytes + 4096)
        except SandboxError as e:
            return f"(log unavailable: {e})"
        return result.stdout.decode(errors="replace")


class SSHForwarder:
    """Client sockets carried over ``tunnel``'s channels; pausing holds new connections in
    the listeners' backlog (clients are neither refused nor sent to a dead port)."""

    def __init__(self, tunnel: SSHTunnel) -> None:
        self.tunnel = tunnel

    @property
    def forwards(self) -> dict[int, tuple[str, int]]:
        """Local port -> (remote host, remote port)."""
        return self.tunnel.forwards

    def forward(self, local_port: int, remote_port: int, sock: socket.socket | None = None) -> int:
        """See :meth:`Forwarder.forward`."""
        return self.tunnel.forward(local_port, remote_port, sock=sock)

    def repoint(self, local_port: int, remote_port: int) -> None:
        """See :meth:`Forwarder.repoint` (a paused forward resumes)."""
        self.tunnel.repoint_forward(local_port, remote_port)

    def pause(self) -> None:
        """Hold every forward until it is repointed (see :meth:`SSHTunnel.pause_forward`)."""
        for local in list(self.tunnel.forwards):
            with contextlib.suppress(SandboxError):
                self.tunnel.pause_forward(local)

    def drop_connections(self) -> None:
        """Close every carried connection; the listeners keep accepting."""
        for local, (_host, remote) in self.tunnel.forwards.items():
            with contextlib.suppress(SandboxError):
                self.tunnel.pause_forward(local)
                self.tunnel.repoint_forward(local, remote)

    def close(self) -> None:
        """The tunnel's forwards close with the tunnel (its owner closes it)."""
