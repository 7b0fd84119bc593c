"""Run one command on a sandbox over an existing SSH transport, with bounded output.

The command is an argv list joined with ``shlex.quote``: user-controlled values never become
shell syntax. Its stdin is fed and closed, its stdout and stderr collected up to a cap (the
remote side, maybe hostile, decides how much it prints), all within one deadline.

All functions block; call them through ``asyncio.to_thread`` from async code.
"""

from __future__ import annotations

import select
import shlex
import time
from collections.abc import Sequence
from typing import NamedTuple

import paramiko

from ..errors import SandboxConfigError, SandboxConnectionError, SandboxError, SandboxTimeout

_CHUNK = 1 << 16
_STDIN_BURST = 1 << 20
DEFAULT_MAX_OUTPUT = 64 << 20
#: The most output kept of a command that answers in a line (a pid, a status).
SMALL_OUTPUT = 4096


class CommandResult(NamedTuple):
    """What :func:`run` returns; unpacks as ``exit_code, stdout, stderr``.

    ``exit_code`` is -1 when the command died of a signal or the server sent no status.
    """

    exit_code: int
    stdout: bytes
    stderr: bytes


def quote_argv(argv: Sequence[str]) -> str:
    """Join ``argv`` into one shell command line, each word quoted with ``shlex.quote``.

    Raises:
        SandboxConfigError: ``argv`` is empty, not a list of strings, or holds a NUL byte.
    """
    if isinstance(argv, (str, bytes)) or not argv:
        raise SandboxConfigError(f"a command must be a non-empty list of strings, not {argv!r}")
    for word in argv:
        if not isinstance(word, str) or "\0" in word:
            raise SandboxConfigError(f"command word {word!r} is not a string without NUL bytes")
    return " ".join(shlex.quote(word) for word in argv)


def run(
    transport: paramiko.Transport,
    argv: Sequence[str],
    input: bytes | None = None,
    timeout: float = 60.0,
    max_output: int = DEFAULT_MAX_OUTPUT,
) -> CommandResult:
    """Run ``argv`` on the remote and collect its exit code, stdout and stderr.

    Args:
        transport: an authenticated transport.
        argv: the command and its arguments, passed literally (quoted for the login shell).
        input: bytes fed to the command's stdin, which is then closed.
        timeout: seconds for the whole command, including sending input.
        max_output: the most bytes kept of stdout plus stderr.

    Returns:
        The exit code, stdout and stderr.

    Raises:
        SandboxConfigError: ``argv`` is not a list of strings.
        SandboxTimeout: the command did not finish in ``timeout`` seconds (its channel is
            closed; the remote process may keep running).
        SandboxConnectionError: the session could not be opened or the connection dropped.
        SandboxError: the command produced more than ``max_output`` bytes.
    """
    command = quote_argv(argv)
    deadline = time.monotonic() + timeout
    channel = open_session(transport, timeout)
    try:
        channel.exec_command(command)
        return _collect(channel, memoryview(input or b""), deadline, max_output, argv)
    except SandboxError:  # SandboxTimeout is an OSError too: keep it as it is
        raise
    except (paramiko.SSHException, OSError, EOFError) as e:
        raise SandboxConnectionError(
            f"running {argv[0]!r} on the sandbox failed: {str(e) or type(e).__name__}"
        ) from e
    finally:
        channel.close()


def open_session(transport: paramiko.Transport, timeout: float) -> paramiko.Channel:
    """Open a session channel.

    Raises:
        SandboxConnectionError: the transport is down or the server refused.
    """
    try:
        return transport.open_session(timeout=timeout)
    except (paramiko.SSHException, OSError, EOFError) as e:
        raise SandboxConnectionError(f"cannot open an SSH session to the sandbox: {e}") from e


def _collect(
    channel: paramiko.Channel,
    stdin: memoryview,
    deadline: float,
    max_output: int,
    argv: Sequence[str],
) -> CommandResult:
    """Feed stdin and gather stdout/stderr until the command exits or the deadline passes.

    Raises:
        SandboxTimeout: the deadline passed.
        SandboxError: more than ``max_output`` bytes of output.
    """
    out, err = bytearray(), bytearray()
    if not stdin:
        channel.shutdown_write()
    poller = select.poll()
    poller.register(channel.fileno(), select.POLLIN)
    while True:
        sent = 0
        if stdin:
            stdin, sent = _feed(channel, stdin)
        while channel.recv_ready():
            out += channel.recv(_CHUNK)
        while channel.recv_stderr_ready():
            err += channel.recv_stderr(_CHUNK)
        if len(out) + len(err) > max_output:
            raise SandboxError(f"{argv[0]!r} wrote more than {max_output} bytes of output")
        if _finished(channel):
            return _result(channel, out, err, argv)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise SandboxTimeout(f"{argv[0]!r} did not finish on the sandbox in time")
        if not sent:
            _wait(channel, poller, min(remaining, 0.005 if stdin else 0.5))


def _feed(channel: paramiko.Channel, stdin: memoryview) -> tuple[memoryview, int]:
    """Send as much of ``stdin`` as the window allows (up to a burst); close it when done.

    Returns:
        The bytes still to send, and how many were sent now.
    """
    sent = 0
    while stdin and sent < _STDIN_BURST and channel.send_ready():
        n = channel.send(bytes(stdin[:_CHUNK]))
        if n == 0:  # the remote closed its stdin: drop the rest, like a broken pipe
            return memoryview(b""), sent
        stdin, sent = stdin[n:], sent + n
    if not stdin:
        channel.shutdown_write()
    return stdin, sent


def _finished(channel: paramiko.Channel) -> bool:
    """Whether the command's status and all its output have arrived (or the channel died)."""
    if not channel.exit_status_ready():
        return False
    if not (channel.eof_received or channel.closed):
        return False
    return not (channel.recv_ready() or channel.recv_stderr_ready())


def _result(
    channel: paramiko.Channel, out: bytearray, err: bytearray, argv: Sequence[str]
) -> CommandResult:
    """Build the result, telling a lost connection apart from a command killed by a signal.

    Raises:
        SandboxConnectionError: the connection dropped before the command's status came.
    """
    code = channel.recv_exit_status()
    transport = channel.get_transport()
    if code == -1 and (transport is None or not transport.is_active()):
        raise SandboxConnectionError(
            f"the SSH connection dropped while {argv[0]!r} was running on the sandbox"
        )
    return CommandResult(code, bytes(out), bytes(err))


def _wait(channel: paramiko.Channel, poller: select.poll, timeout: float) -> None:
    """Sleep until the channel has news (output, EOF, exit status) or ``timeout`` passes."""
    if channel.eof_received or channel.closed:
        channel.status_event.wait(timeout)
    else:
        poller.poll(timeout * 1000)


def tail_text(data: bytes, limit: int = 500) -> str:
    """The last ``limit`` characters of remote stderr, decoded, for error messages."""
    text = data.decode(errors="replace").strip()
    return text if len(text) <= limit else f"...{text[-limit:]}"


def check_path(path: str, what: str, absolute: bool = False) -> None:
    """Refuse an empty path, one with NUL or newline, or one that is not a string.

    Args:
        path: the remote path.
        what: its name, for the message.
        absolute: also require an absolute path.

    Raises:
        SandboxConfigError: the path is unusable.
    """
    if not isinstance(path, str) or not path or "\0" in path or "\n" in path:
        raise SandboxConfigError(f"{what}={path!r} is not a usable remote path")
    if absolute and not path.startswith("/"):
        raise SandboxConfigError(f"{what}={path!r} must be an absolute path")
