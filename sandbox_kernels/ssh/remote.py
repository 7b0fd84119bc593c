"""Run commands on a sandbox over an existing SSH transport.

User-controlled values never become shell syntax: every command is an argv list joined with
``shlex.quote``, and the few shell scripts here are constants that read their data from
positional parameters (``"$1"``, ``"$@"``). Environment variable names are checked against a
strict pattern; values reach the process byte for byte.

A detached process runs under a small wrapper that starts a new session (``setsid``), so it
survives the SSH connection dropping, and writes the process's exit status to
``<log_path>.exit`` when it ends. Its environment values travel on the command's stdin, never
in argv (which every user of the remote host reads in ``/proc/*/cmdline``). :func:`process_status` uses that file to tell a process that
is still running from one that exited (with its code) from one that is gone (killed with
SIGKILL, or the machine restarted).

Everything read back from the remote is bounded: the sandbox (or another user of the host)
may write those files, so pids and exit codes are parsed from a few bytes only
(:func:`parse_int`), and command output is capped.

All functions block; call them through ``asyncio.to_thread`` from async code.
"""

from __future__ import annotations

import re
import select
import shlex
import signal as signal_module
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import paramiko

from ..errors import (
    SandboxConfigError,
    SandboxConnectionError,
    SandboxError,
    SandboxStartError,
    SandboxTimeout,
)

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DIGITS = re.compile(r"[0-9]+")
#: The most digits accepted in a pid or exit status read from the remote.
MAX_INT_DIGITS = 10
#: The most bytes of an environment file (names and quoted values) sent to a detached process.
MAX_ENV_BYTES = 16 << 20
_CHUNK = 1 << 16
_STDIN_BURST = 1 << 20
DEFAULT_MAX_OUTPUT = 64 << 20
#: The most output kept of a command that answers in a line (a pid, a status).
_SMALL_OUTPUT = 4096

# Positional parameters: $1 cwd ('' = stay in the login directory), $2 log path, $3 the
# wrapper script, $4 the size of the environment file on stdin, then the command. The log and
# the environment file are created new (noclobber: a planted symlink fails the start instead of
# being followed), 0600; the wrapper reads the environment file and removes it.
_LAUNCH_ENV_STDIN_SCRIPT = """\
command -v setsid >/dev/null || { echo "setsid (util-linux) is not installed" >&2; exit 125; }
if [ -n "$1" ]; then cd -- "$1" || exit 125; fi
log=$2
wrapper=$3
size=$4
shift 4
rm -f -- "$log" "$log.exit" "$log.env" || exit 125
(umask 077 && set -C && : >"$log" && head -c "$size" >"$log.env") || exit 125
[ "$(wc -c <"$log.env")" -eq "$size" ] || { rm -f -- "$log.env"; exit 125; }
setsid sh -c "$wrapper" sandbox-kernels-wrapper "$log.exit" "$log.env" "$@" </dev/null >>"$log" 2>&1 &
echo "$!"
"""

# Positional parameters: $1 exit-status file, $2 environment file (``export NAME='value'``
# lines, every value quoted by shlex.quote: no expansion), then the command. Traps (not
# ignores) stop the wrapper dying of a signal meant for the process group; the child gets
# default handlers back, so an interrupt reaches it as usual.
_WRAPPER_ENV_FILE_SCRIPT = """\
exitfile=$1
envfile=$2
shift 2
vars=$(cat -- "$envfile") || exit 125
rm -f -- "$envfile"
eval "$vars" || exit 125
unset vars
trap : HUP INT QUIT TERM
"$@"
rc=$?
echo "$rc" >"$exitfile"
exit "$rc"
"""

# The argv-only protocol (NAME=VALUE words in argv), for launchers whose argv only the sandbox
# itself can read (a pod's exec). Positional parameters as for _LAUNCH_ENV_STDIN_SCRIPT, without $4.
_LAUNCH_SCRIPT = """\
command -v setsid >/dev/null || { echo "setsid (util-linux) is not installed" >&2; exit 125; }
if [ -n "$1" ]; then cd -- "$1" || exit 125; fi
log=$2
wrapper=$3
shift 3
rm -f -- "$log" "$log.exit" || exit 125
(umask 077 && : >"$log") || exit 125
setsid sh -c "$wrapper" sandbox-kernels-wrapper "$log.exit" "$@" </dev/null >>"$log" 2>&1 &
echo "$!"
"""

# $1 exit-status file, $2 number of NAME=VALUE words, the words, argv (see _LAUNCH_SCRIPT).
_WRAPPER_SCRIPT = """\
exitfile=$1
n=$2
shift 2
while [ "$n" -gt 0 ]; do export "$1" || exit 125; shift; n=$((n - 1)); done
trap : HUP INT QUIT TERM
"$@"
rc=$?
echo "$rc" >"$exitfile"
exit "$rc"
"""

# Defines alive PID: true if the process exists and is not a zombie (a zombie still takes
# signals, but has ended).
_ALIVE = """\
alive() {
    kill -0 "$1" 2>/dev/null || return 1
    [ "$(sed -n 's/^.*) \\(.\\).*$/\\1/p' "/proc/$1/stat" 2>/dev/null)" != Z ]
}
"""

# $1 pid, $2 exit-status file.
_STATUS_SCRIPT = _ALIVE + """\
if alive "$1"; then echo running; exit 0; fi
if [ -f "$2" ]; then echo "exited $(head -c 16 -- "$2")"; else echo gone; fi
"""

# $1 signal name, $2 pid: the process group first (the wrapper made one), then the process.
# Exit status 3: no such (live) process.
_SIGNAL_SCRIPT = _ALIVE + """\
alive "$2" || exit 3
kill -s "$1" -- "-$2" 2>/dev/null || kill -s "$1" "$2"
"""

# $1 target path, $2 octal mode; data on stdin. Written to a 0600 temporary file, then renamed.
_WRITE_SCRIPT = """\
tmp=$(mktemp "$1.XXXXXX") || exit 1
cat >"$tmp" && chmod "$2" "$tmp" && mv -f -- "$tmp" "$1" && exit 0
rc=$?
rm -f -- "$tmp"
exit "$rc"
"""


class CommandResult(NamedTuple):
    """What :func:`run` returns; unpacks as ``exit_code, stdout, stderr``.

    ``exit_code`` is -1 when the command died of a signal or the server sent no status.
    """

    exit_code: int
    stdout: bytes
    stderr: bytes


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
    channel = _open_session(transport, timeout)
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


def start_detached(
    transport: paramiko.Transport,
    argv: Sequence[str],
    log_path: str,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    timeout: float = 30.0,
) -> int:
    """Start a long-running process that survives the SSH connection dropping.

    The process runs in a new session (``setsid``) with stdin from ``/dev/null``, stdout and
    stderr going to ``log_path`` (replaced by a new file of mode 0600); when it ends, its
    exit status is written to ``<log_path>.exit``. The returned pid is that of the wrapper,
    which leads the process group; :func:`send_signal` signals the whole group.

    The environment travels on the command's stdin into ``<log_path>.env`` (created new,
    0600), which the wrapper reads and removes before the process starts: no value ever
    appears in a command line. ``log_path`` must therefore be in a directory no other user
    can write.

    Args:
        transport: an authenticated transport.
        argv: the command and its arguments, passed literally.
        log_path: the remote log file (absolute path).
        env: extra environment variables; names must match ``[A-Za-z_][A-Za-z0-9_]*``,
            values are passed literally (no expansion of ``$``, backticks or ``;``).
        cwd: the remote working directory; ``None`` keeps the login directory.
        timeout: seconds for starting (not for the process itself).

    Returns:
        The remote pid.

    Raises:
        SandboxConfigError: a bad command, env name or path.
        SandboxStartError: the remote shell could not start the process, or did not answer
            with a pid.
        SandboxTimeout: starting took longer than ``timeout``.
        SandboxConnectionError: the connection failed.
    """
    quote_argv(argv)
    data = env_file(env or {})
    _check_path(log_path, "log_path", absolute=True)
    if cwd is not None:
        _check_path(cwd, "cwd")
    launch = ["sh", "-c", _LAUNCH_ENV_STDIN_SCRIPT, "sandbox-kernels-launch", cwd or "", log_path,
              _WRAPPER_ENV_FILE_SCRIPT, str(len(data)), *argv]
    result = run(transport, launch, input=data, timeout=timeout, max_output=_SMALL_OUTPUT)
    pid = _number(result.stdout)
    if result.exit_code != 0 or pid is None:
        raise SandboxStartError(
            f"could not start {argv[0]!r} on the sandbox (exit {result.exit_code}): "
            f"{_tail(result.stderr) or _tail(result.stdout) or 'no output'}"
        )
    return pid


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
    value = _number(text, max_digits)
    if value is None:
        shown = text[:40] if isinstance(text, str) else text[:40].decode(errors="replace")
        raise SandboxError(
            f"{what} from the sandbox is not a number of at most {max_digits} digits: {shown!r}")
    return value


def _number(text: str | bytes, max_digits: int = MAX_INT_DIGITS) -> int | None:
    """``text`` as an int if it is 1 to ``max_digits`` ASCII digits (whitespace around), else None."""
    if isinstance(text, bytes):
        text = text.decode("ascii", errors="replace")
    text = text.strip()
    if len(text) > max_digits or not _DIGITS.fullmatch(text):
        return None
    return int(text)


def process_status(
    transport: paramiko.Transport, pid: int, log_path: str, timeout: float = 30.0
) -> ProcessStatus:
    """Tell whether a process from :func:`start_detached` runs, exited (with what), or is gone.

    Raises:
        SandboxConfigError: ``pid`` is not a positive process id above 1.
        SandboxError: the remote status check failed.
        SandboxTimeout, SandboxConnectionError: as for :func:`run`.
    """
    _check_pid(pid)
    _check_path(log_path, "log_path", absolute=True)
    script = ["sh", "-c", _STATUS_SCRIPT, "sandbox-kernels-status", str(pid), f"{log_path}.exit"]
    result = run(transport, script, timeout=timeout, max_output=_SMALL_OUTPUT)
    words = result.stdout.decode(errors="replace").split()
    if result.exit_code != 0 or not words:
        raise SandboxError(f"checking process {pid} on the sandbox failed: {_tail(result.stderr)}")
    if words[0] == "running":
        return ProcessStatus("running")
    if words == ["exited"]:
        return ProcessStatus("running")  # the wrapper is writing the file right now
    return _ended(words)


def process_alive(transport: paramiko.Transport, pid: int, timeout: float = 30.0) -> bool:
    """Whether process ``pid`` exists on the remote (and is not a zombie).

    Raises:
        SandboxConfigError: ``pid`` is not above 1.
        SandboxTimeout, SandboxConnectionError: as for :func:`run`.
    """
    _check_pid(pid)
    script = ["sh", "-c", _STATUS_SCRIPT, "sandbox-kernels-status", str(pid), "/nonexistent"]
    return run(transport, script, timeout=timeout, max_output=_SMALL_OUTPUT).stdout.startswith(b"running")


def send_signal(
    transport: paramiko.Transport, pid: int, signum: int, timeout: float = 30.0
) -> bool:
    """Send ``signum`` to the process group led by ``pid`` (or to ``pid`` alone if none).

    The signal is sent by name (``kill -s INT``), so the remote's numbering does not matter.

    Returns:
        ``True`` if delivered, ``False`` if no such process exists.

    Raises:
        SandboxConfigError: ``pid`` is not above 1 or ``signum`` is not a signal.
        SandboxError: ``kill`` failed for another reason (e.g. permission).
        SandboxTimeout, SandboxConnectionError: as for :func:`run`.
    """
    _check_pid(pid)
    try:
        name = signal_module.Signals(signum).name.removeprefix("SIG")
    except ValueError as e:
        raise SandboxConfigError(f"{signum!r} is not a signal number") from e
    script = ["sh", "-c", _SIGNAL_SCRIPT, "sandbox-kernels-signal", name, str(pid)]
    result = run(transport, script, timeout=timeout, max_output=_SMALL_OUTPUT)
    if result.exit_code == 0:
        return True
    if result.exit_code == 3 or not process_alive(transport, pid, timeout):
        return False
    raise SandboxError(f"sending SIG{name} to process {pid} failed: {_tail(result.stderr)}")


def write_file(
    transport: paramiko.Transport,
    path: str,
    data: bytes,
    mode: int = 0o600,
    timeout: float = 60.0,
) -> None:
    """Write ``data`` to the remote file ``path`` atomically, with ``mode``.

    The bytes go to a temporary file created 0600 next to ``path``, which is then given
    ``mode`` and renamed over ``path``: no reader ever sees a partial file or wider rights.

    Raises:
        SandboxConfigError: a bad path or mode.
        SandboxError: the remote write failed (message includes the remote error).
        SandboxTimeout, SandboxConnectionError: as for :func:`run`.
    """
    _check_path(path, "path")
    if not 0 <= mode <= 0o7777:
        raise SandboxConfigError(f"file mode {mode!r} is not between 0 and 0o7777")
    target = path if path.startswith("/") else f"./{path}"
    script = ["sh", "-c", _WRITE_SCRIPT, "sandbox-kernels-write", target, f"{mode:o}"]
    result = run(transport, script, input=data, timeout=timeout, max_output=_SMALL_OUTPUT)
    if result.exit_code != 0:
        raise SandboxError(f"writing {path} on the sandbox failed: {_tail(result.stderr)}")


def _open_session(transport: paramiko.Transport, timeout: float) -> paramiko.Channel:
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


def env_file(env: Mapping[str, str]) -> bytes:
    """``env`` as ``export NAME='value'`` lines for a POSIX shell, every value quoted by
    ``shlex.quote`` (so no ``$``, backtick or ``;`` is ever evaluated).

    Raises:
        SandboxConfigError: a name does not match the pattern, a value is not a string or
            holds NUL, or the whole is larger than ``MAX_ENV_BYTES``.
    """
    data = "".join(f"export {name}={shlex.quote(value)}\n" for name, value in _checked_env(env))
    encoded = data.encode("utf-8", errors="surrogateescape")
    if len(encoded) > MAX_ENV_BYTES:
        raise SandboxConfigError(
            f"the kernel's environment is {len(encoded)} bytes; at most {MAX_ENV_BYTES} are sent")
    return encoded


def _env_words(env: Mapping[str, str]) -> list[str]:
    """Turn ``env`` into ``NAME=VALUE`` words after checking every name and value.

    Only for launchers whose argv nobody but the sandbox can read (see ``_LAUNCH_SCRIPT``).

    Raises:
        SandboxConfigError: a name does not match the pattern or a value is not a string.
    """
    return [f"{name}={value}" for name, value in _checked_env(env)]


def _checked_env(env: Mapping[str, str]) -> list[tuple[str, str]]:
    """The items of ``env`` after checking every name and value.

    Raises:
        SandboxConfigError: a name does not match the pattern or a value is not a string.
    """
    items = []
    for name, value in env.items():
        if not isinstance(name, str) or not ENV_NAME.fullmatch(name):
            raise SandboxConfigError(
                f"environment variable name {name!r} is invalid: use letters, digits and '_', "
                "not starting with a digit."
            )
        if not isinstance(value, str) or "\0" in value:
            raise SandboxConfigError(f"environment variable {name} must be a string without NUL")
        items.append((name, value))
    return items


def _check_path(path: str, what: str, absolute: bool = False) -> None:
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


def _check_pid(pid: int) -> None:
    """Refuse pids that would address many processes (0, 1, negatives) or are not ints.

    Raises:
        SandboxConfigError: ``pid`` is not an int above 1.
    """
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 1:
        raise SandboxConfigError(f"{pid!r} is not a process id this can address (must be > 1)")


def _tail(data: bytes, limit: int = 500) -> str:
    """The last ``limit`` characters of remote stderr, decoded, for error messages."""
    text = data.decode(errors="replace").strip()
    return text if len(text) <= limit else f"...{text[-limit:]}"


def _ended(words: list[str]) -> ProcessStatus:
    """How a process that no longer runs ended, from a status report's words.

    ``exited N`` with a plausible exit status is an exit; anything else (no status file, or
    one the process itself filled with something that is not an exit status) is "gone".
    """
    code = _number(words[1]) if len(words) == 2 and words[0] == "exited" else None
    return ProcessStatus("gone") if code is None else ProcessStatus("exited", code)


_WATCH_SCRIPT = r"""
pid=$1 exitfile=$2
while kill -0 "$pid" 2>/dev/null; do sleep 0.5; done
for _ in 1 2 3 4; do
    if [ -s "$exitfile" ]; then echo "exited $(head -c 16 -- "$exitfile")"; exit 0; fi
    sleep 0.25
done
echo gone
"""


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
            while self._channel.recv_ready() and len(out) < _SMALL_OUTPUT:
                out += self._channel.recv(_SMALL_OUTPUT - len(out))
            words = out.decode(errors="replace").split()
            if words[:1] in (["exited"], ["gone"]):
                self._status = _ended(words)
            else:
                self._no_report = True  # the session ended without a report: broken
                return None
            self._channel.close()
        return self._status

    def close(self) -> None:
        """Stop watching."""
        self._channel.close()


def watch_process(transport: paramiko.Transport, pid: int, log_path: str, timeout: float = 30.0) -> ProcessWatch:
    """Watch a process from :func:`start_detached` until it ends.

    Raises:
        SandboxConfigError: a bad pid or path.
        SandboxConnectionError: the session could not be opened.
    """
    _check_pid(pid)
    _check_path(log_path, "log_path")
    channel = _open_session(transport, timeout)
    argv = ["sh", "-c", _WATCH_SCRIPT, "sandbox-kernels-watch", str(pid), f"{log_path}.exit"]
    try:
        channel.exec_command(quote_argv(argv))
    except (paramiko.SSHException, OSError, EOFError) as e:
        channel.close()
        raise SandboxConnectionError(f"cannot start the process watch on the sandbox: {e}") from e
    return ProcessWatch(channel)
