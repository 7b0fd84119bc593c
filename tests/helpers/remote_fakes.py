"""Fakes of the remote-kernel protocols (:mod:`sandbox_kernels.remote.shell`) for unit tests.

:class:`FakeShell` plays a sandbox: files, detached processes and scripted answers to the shared
scripts (wait for ports, fork), including the fault cases a real one cannot produce on demand.
:class:`FakeForwarder` records forwards, pauses and repoints.
"""

from __future__ import annotations

import signal
import socket
from collections.abc import Mapping, Sequence
from typing import Any

from sandbox_kernels.errors import SandboxNotFound
from sandbox_kernels.remote import scripts
from sandbox_kernels.remote.kernel import CHANNELS
from sandbox_kernels.remote.shell import CommandResult, ProcessStatus

PORTS = {ch: 40000 + i for i, ch in enumerate(CHANNELS)}
LOCAL = {ch: 50000 + i for i, ch in enumerate(CHANNELS)}


class FakeWatch:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.ended: ProcessStatus | None = None
        self.broken = False
        self.closed = False

    def status(self) -> ProcessStatus | None:
        return self.ended

    def close(self) -> None:
        self.closed = True


class FakeShell:
    """A sandbox: files, processes started detached, scripted answers to the shared scripts."""

    def __init__(self, *, watches: bool = True) -> None:
        self.files: dict[str, bytes] = {}
        self.started: list[tuple[list[str], str, dict[str, str]]] = []
        self.signals: list[tuple[int, int]] = []
        self.runs: list[list[str]] = []
        self.watches: list[FakeWatch] = []
        self.next_pid = 100
        self.connection_reply: bytes | None = None  # what WAIT_PORTS prints (None: kernel died)
        self.exit_codes: dict[int, int] = {}
        self.fork_replies: list[int] = []  # FORK exit codes, in order (0: forked)
        self.gave_up = False
        self.last_error: BaseException | None = None
        self.signal_error: BaseException | None = None
        self.watch_error: BaseException | None = None
        self.has_watch = watches
        self.running: set[int] = set()

    def _pid(self) -> int:
        self.next_pid += 1
        self.running.add(self.next_pid)
        return self.next_pid

    def run(self, argv: Sequence[str], input: bytes | None = None, timeout: float = 60.0,
            max_output: int = 64 << 20) -> CommandResult:
        self.runs.append(list(argv))
        if argv[:3] == ["sh", "-c", scripts.WAIT_PORTS]:
            if self.connection_reply is None:
                return CommandResult(3, b"", b"")
            return CommandResult(0, self.connection_reply[:max_output], b"")
        if argv[:3] == ["sh", "-c", scripts.FORK]:
            code = self.fork_replies.pop(0) if self.fork_replies else 0
            if code == 0:
                return CommandResult(0, f"{self._pid()}\n".encode(), b"")
            return CommandResult(code, b"", b"cannot write" if code == 4 else b"")
        return CommandResult(0, b"", b"")

    def write_file(self, path: str, data: bytes, mode: int = 0o600, timeout: float = 60.0) -> None:
        self.files[path] = data

    def start_detached(self, argv: Sequence[str], log_path: str, env: Mapping[str, str] | None = None,
                       cwd: str | None = None, timeout: float = 30.0) -> int:
        self.started.append((list(argv), log_path, dict(env or {})))
        return self._pid()

    def status(self, pid: int, log_path: str, timeout: float = 30.0) -> ProcessStatus:
        if pid in self.running:
            return ProcessStatus("running")
        if pid in self.exit_codes:
            return ProcessStatus("exited", self.exit_codes[pid])
        return ProcessStatus("gone")

    def watch(self, pid: int, log_path: str, timeout: float = 30.0) -> FakeWatch | None:
        if self.watch_error is not None:
            raise self.watch_error
        if not self.has_watch:
            return None
        self.watches.append(FakeWatch(pid))
        return self.watches[-1]

    def signal(self, pid: int, signum: int, timeout: float = 30.0) -> bool:
        if self.signal_error is not None:
            raise self.signal_error
        self.signals.append((pid, signum))
        if signum == signal.SIGKILL:
            self.running.discard(pid)
        return True

    def tail(self, path: str, max_bytes: int) -> str:
        return f"tail of {path}"

    def exit(self, pid: int, code: int) -> None:
        self.running.discard(pid)
        self.exit_codes[pid] = code
        for w in self.watches:
            if w.pid == pid and not w.closed:
                w.ended = ProcessStatus("exited", code)


class FakeForwarder:
    def __init__(self) -> None:
        self.targets: dict[int, int] = {}
        self.paused = False
        self.events: list[str] = []
        self.closed = False

    @property
    def forwards(self) -> dict[int, int]:
        return dict(self.targets)

    def forward(self, local_port: int, remote_port: int, sock: socket.socket | None = None) -> int:
        assert local_port not in self.targets
        self.targets[local_port] = remote_port
        self.events.append(f"forward {local_port}")
        return local_port

    def repoint(self, local_port: int, remote_port: int) -> None:
        if local_port not in self.targets:
            raise SandboxNotFound(str(local_port))
        self.targets[local_port] = remote_port
        self.paused = False
        self.events.append(f"repoint {local_port}")

    def pause(self) -> None:
        self.paused = True
        self.events.append("pause")

    def drop_connections(self) -> None:
        self.events.append("drop")

    def close(self) -> None:
        self.closed = True


class Sockets:
    def __init__(self) -> None:
        self.claimed: list[int] = []

    def claim(self, port: int) -> Any:
        self.claimed.append(port)
        return None
