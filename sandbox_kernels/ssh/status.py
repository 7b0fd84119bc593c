"""How a detached process on a sandbox ended, read back in a few bounded bytes.

The exit-status file, the pid a launcher prints and a watch's report all come from the remote,
where the sandbox (or another user of the host) may have written them: numbers are a few ASCII
digits or nothing (:func:`parse_int`), and a report is read up to a few KiB.

All functions block; call them through ``asyncio.to_thread`` from async code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import paramiko

from ..errors import SandboxConfigError, SandboxConnectionError, SandboxError
from ..remote.scripts import WATCH
from .runner import SMALL_OUTPUT, check_path, open_session, quote_argv

_DIGITS = re.compile(r"[0-9]+")
#: The most digits accepted in a pid or exit status read from the remote.
MAX_INT_DIGITS = 10


@dataclass(frozen=True)
class ProcessStatus:
    """The state of a detached process.

    Attributes:
        state: ``"running"``, ``"exited"`` (``exit_code`` set; 128+N for signal N) or
            ``"gone"`` (not running and no exit status was recorded).
        exit_code: the exit status when ``state == "exited"``, else ``None``.
    """

    state: Literal["running", "exited", "gone"]
    exit_code: int | None = None


def parse_int(text: str | bytes, what: str, max_digits: int = MAX_INT_DIGITS) -> int:
    """Parse a pid, port or exit status read from the remote: a few ASCII digits, nothing else.

    ``int()`` alone accepts signs, underscores and other scripts' digits, and raises
    ``ValueError`` (outside the error tree) past 4,300 digits; whatever the remote sends
    must end in a :class:`SandboxError` instead.

    Args:
        text: the remote's answer; surrounding whitespace is ignored.
        what: what the number is, for the message.
        max_digits: the most digits accepted.

    Raises:
        SandboxError: ``text`` is not 1 to ``max_digits`` ASCII digits.
    """
    value = number(text, max_digits)
    if value is None:
        shown = text[:40] if isinstance(text, str) else text[:40].decode(errors="replace")
        raise SandboxError(
            f"{what} from the sandbox is not a number of at most {max_digits} digits: {shown!r}")
    return value


def number(text: str | bytes, max_digits: int = MAX_INT_DIGITS) -> int | None:
    """``text`` as an int if it is 1 to ``max_digits`` ASCII digits (whitespace around), else None."""
    if isinstance(text, bytes):
        text = text.decode("ascii", errors="replace")
    text = text.strip()
    if len(text) > max_digits or not _DIGITS.fullmatch(text):
        return None
    return int(text)


def check_pid(pid: int) -> None:
    """Refuse pids that would address many processes (0, 1, negatives) or are not ints.

    Raises:
        SandboxConfigError: ``pid`` is not an int above 1.
    """
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 1:
        raise SandboxConfigError(f"{pid!r} is not a process id this can address (must be > 1)")


def ended(words: list[str]) -> ProcessStatus:
    """How a process that no longer runs ended, from a status report's words.

    ``exited N`` with a plausible exit status is an exit; anything else (no status file, or
    one the process itself filled with something that is not an exit status) is "gone".
    """
    code = number(words[1]) if len(words) == 2 and words[0] == "exited" else None
    return ProcessStatus("gone") if code is None else ProcessStatus("exited", code)


class ProcessWatch:
    """A session that runs while a detached process runs and then reports how it ended.

    Polling it costs nothing on either side: the remote shell waits, and :meth:`status`
    only looks at the channel locally. A dropped connection closes the channel without an
    exit status; :attr:`broken` then tells the caller to open a new watch.
    """

    def __init__(self, channel: paramiko.Channel) -> None:
        self._channel = channel
        self._status: ProcessStatus | None = None
        self._no_report = False

    @property
    def broken(self) -> bool:
        """The channel closed without the watcher's report (connection lost)."""
        if self._status is not None:
            return False
        if self._channel.exit_status_ready():
            return self.status() is None and self._no_report
        transport = self._channel.get_transport()
        return self._channel.closed or transport is None or not transport.is_active()

    def status(self) -> ProcessStatus | None:
        """None while the process runs (or the watch is broken), else how it ended."""
        if self._status is None and self._channel.exit_status_ready():
            out = b""
            while self._channel.recv_ready() and len(out) < SMALL_OUTPUT:
                out += self._channel.recv(SMALL_OUTPUT - len(out))
            words = out.decode(errors="replace").split()
            if words[:1] in (["exited"], ["gone"]):
                self._status = ended(words)
            else:
                self._no_report = True  # the session ended without a report: broken
                return None
            self._channel.close()
        return self._status

    def close(self) -> None:
        """Stop watching."""
        self._channel.close()


def watch_process(transport: paramiko.Transport, pid: int, log_path: str, timeout: float = 30.0) -> ProcessWatch:
    """Watch a process from :func:`sandbox_kernels.ssh.processes.start_detached` until it ends.

    Raises:
        SandboxConfigError: a bad pid or path.
        SandboxConnectionError: the session could not be opened.
    """
    check_pid(pid)
    check_path(log_path, "log_path")
    channel = open_session(transport, timeout)
    argv = ["sh", "-c", WATCH, "sandbox-kernels-watch", str(pid), f"{log_path}.exit"]
    try:
        channel.exec_command(quote_argv(argv))
    except (paramiko.SSHException, OSError, EOFError) as e:
        channel.close()
        raise SandboxConnectionError(f"cannot start the process watch on the sandbox: {e}") from e
    return ProcessWatch(channel)
