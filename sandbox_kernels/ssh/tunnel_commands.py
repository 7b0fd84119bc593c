"""Remote commands as methods of the tunnel (mixed into ``SSHTunnel``).

The work is done by the transport-level functions of :mod:`sandbox_kernels.ssh.processes`; this mixin connects first when needed,
spends one deadline on connecting and running, and remembers the log path of each detached
process so callers can ask about it by pid alone.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

import paramiko

from ..errors import SandboxConfigError, SandboxNotFound
from . import processes
from .status import ProcessWatch, watch_process


class RemoteCommands(ABC):
    """Run commands, start and watch detached processes, write files, send signals.

    Subclasses implement :meth:`_transport_for_call` and set ``_logger``; they call
    ``super().__init__()``.
    """

    _logger: logging.Logger

    def __init__(self) -> None:
        self._detached: dict[int, str] = {}
        self._detached_lock = threading.Lock()

    @abstractmethod
    def _transport_for_call(self, timeout: float) -> paramiko.Transport:
        """The live transport, connecting first if needed.

        Called at the start of every command method.

        Raises:
            SandboxConnectionError, HostKeyMismatch, SandboxTimeout: no connection.
        """

    def run(
        self,
        argv: Sequence[str],
        input: bytes | None = None,
        timeout: float = 60.0,
        max_output: int = processes.DEFAULT_MAX_OUTPUT,
    ) -> processes.CommandResult:
        """Run ``argv`` on the sandbox; see :func:`sandbox_kernels.ssh.processes.run`.

        ``max_output`` caps stdout plus stderr: pass a small one for commands that read files
        the sandbox writes.

        Returns:
            ``(exit_code, stdout, stderr)``.

        Raises:
            SandboxConfigError: ``argv`` is not a list of strings.
            SandboxTimeout: no connection, or the command ran past ``timeout``.
            SandboxConnectionError, HostKeyMismatch: the connection failed.
            SandboxError: more than ``max_output`` bytes of output.
        """
        deadline = time.monotonic() + timeout
        transport = self._transport_for_call(timeout)
        return processes.run(transport, argv, input, _remaining(deadline), max_output)

    def start_detached(
        self,
        argv: Sequence[str],
        log_path: str,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float = 30.0,
    ) -> int:
        """Start a process that outlives the SSH connection; see
        :func:`sandbox_kernels.ssh.processes.start_detached`.

        Returns:
            The remote pid (leader of the process's group).

        The environment travels on stdin, never in a command line; ``log_path`` must be in a
        directory only the login user can write.

        Raises:
            SandboxConfigError: a bad command, env name or path.
            SandboxStartError: the process could not be started.
            SandboxTimeout, SandboxConnectionError: as for :meth:`run`.
        """
        deadline = time.monotonic() + timeout
        transport = self._transport_for_call(timeout)
        pid = processes.start_detached(transport, argv, log_path, env, cwd, _remaining(deadline))
        with self._detached_lock:
            self._detached[pid] = log_path
        self._logger.debug("started %r as remote pid %d (log %s)", argv[0], pid, log_path)
        return pid

    def write_file(self, path: str, data: bytes, mode: int = 0o600, timeout: float = 60.0) -> None:
        """Write a remote file atomically; see :func:`sandbox_kernels.ssh.processes.write_file`.

        Raises:
            SandboxConfigError, SandboxError, SandboxTimeout, SandboxConnectionError: as there.
        """
        deadline = time.monotonic() + timeout
        transport = self._transport_for_call(timeout)
        processes.write_file(transport, path, data, mode, _remaining(deadline))

    def signal(self, pid: int, signum: int, timeout: float = 30.0) -> bool:
        """Signal a remote process group; see :func:`sandbox_kernels.ssh.processes.send_signal`.

        Returns:
            ``False`` if the process no longer runs.

        Raises:
            SandboxConfigError, SandboxError, SandboxTimeout, SandboxConnectionError: as there.
        """
        deadline = time.monotonic() + timeout
        transport = self._transport_for_call(timeout)
        return processes.send_signal(transport, pid, signum, _remaining(deadline))

    def process_alive(self, pid: int, timeout: float = 30.0) -> bool:
        """Whether remote process ``pid`` exists and is not a zombie.

        Raises:
            SandboxConfigError, SandboxTimeout, SandboxConnectionError: as for :meth:`run`.
        """
        deadline = time.monotonic() + timeout
        transport = self._transport_for_call(timeout)
        return processes.process_alive(transport, pid, _remaining(deadline))

    def process_status(
        self, pid: int, log_path: str | None = None, timeout: float = 30.0
    ) -> processes.ProcessStatus:
        """Running, exited (with code) or gone; see
        :func:`sandbox_kernels.ssh.processes.process_status`.

        Args:
            pid: a pid from :meth:`start_detached`.
            log_path: its log path; remembered for pids started through this object.
            timeout: seconds for the check.

        Raises:
            SandboxConfigError: ``log_path`` is needed but not given.
            SandboxError, SandboxTimeout, SandboxConnectionError: as for :meth:`run`.
        """
        with self._detached_lock:
            log_path = log_path or self._detached.get(pid)
        if log_path is None:
            raise SandboxConfigError(f"pid {pid} was not started here: pass its log_path")
        deadline = time.monotonic() + timeout
        transport = self._transport_for_call(timeout)
        return processes.process_status(transport, pid, log_path, _remaining(deadline))

    def watch_process(self, pid: int, log_path: str, timeout: float = 30.0) -> ProcessWatch:
        """A cheap, push-style watch of a detached process; see :func:`sandbox_kernels.ssh.status.watch_process`.

        Raises:
            SandboxConfigError, SandboxTimeout, SandboxConnectionError: as for :meth:`run`.
        """
        return watch_process(self._transport_for_call(timeout), pid, log_path, timeout)

    def process_exit_code(
        self, pid: int, log_path: str | None = None, timeout: float = 30.0
    ) -> int | None:
        """The exit code of a detached process (128+N if signal N ended it), ``None`` while
        it runs.

        Raises:
            SandboxNotFound: the process is gone without an exit status (killed with SIGKILL,
                or the sandbox restarted).
            SandboxConfigError, SandboxError, SandboxTimeout, SandboxConnectionError: as for
                :meth:`process_status`.
        """
        status = self.process_status(pid, log_path, timeout)
        if status.state == "gone":
            raise SandboxNotFound(
                f"remote process {pid} is not running and left no exit status "
                "(killed with SIGKILL, or the sandbox restarted)"
            )
        return status.exit_code


def _remaining(deadline: float) -> float:
    """Seconds left until ``deadline``; at least a moment, so a call can still fail cleanly."""
    return max(0.1, deadline - time.monotonic())
