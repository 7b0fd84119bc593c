"""Detached processes, files and signals on a sandbox over an existing SSH transport.

Commands run through :func:`sandbox_kernels.ssh.runner.run` (re-exported here): user-controlled
values never become shell syntax; the few shell scripts here are constants that read their
data from positional parameters (``"$1"``, ``"$@"``). Environment variable names are checked
against a strict pattern; values reach the process byte for byte.

A detached process runs under a small wrapper that starts a new session (``setsid``), so it
survives the SSH connection dropping, and writes the process's exit status to
``<log_path>.exit`` when it ends. Its environment values travel on the command's stdin, never
in argv (which every user of the remote host reads in ``/proc/*/cmdline``).
:func:`process_status` uses the status file to tell a process that is still running from one
that exited (with its code) from one that is gone (killed with SIGKILL, or the machine
restarted).

Everything read back from the remote is bounded: the sandbox (or another user of the host)
may write those files, so pids and exit codes are parsed from a few bytes only
(:func:`parse_int`), and command output is capped.

All functions block; call them through ``asyncio.to_thread`` from async code.
"""

from __future__ import annotations

import re
import shlex
import signal as signal_module
from collections.abc import Mapping, Sequence

import paramiko

from ..errors import SandboxConfigError, SandboxError, SandboxStartError
from .runner import DEFAULT_MAX_OUTPUT, SMALL_OUTPUT, CommandResult, check_path, quote_argv, run, tail_text
from .status import ProcessStatus, ProcessWatch, check_pid, ended, number, parse_int, watch_process

__all__ = ["DEFAULT_MAX_OUTPUT", "CommandResult", "ProcessStatus", "ProcessWatch", "env_file",
           "parse_int", "process_alive", "process_status", "quote_argv", "run", "send_signal",
           "start_detached", "watch_process", "write_file"]

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: The most bytes of an environment file (names and quoted values) sent to a detached process.
MAX_ENV_BYTES = 16 << 20

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
# Exit status 3: no such (live) process; its group is signalled all the same, so a dead
# kernel's leftover children (what a fork bomb left) go too.
_SIGNAL_SCRIPT = _ALIVE + """\
if ! alive "$2"; then kill -s "$1" -- "-$2" 2>/dev/null; exit 3; fi
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
    check_path(log_path, "log_path", absolute=True)
    if cwd is not None:
        check_path(cwd, "cwd")
    launch = ["sh", "-c", _LAUNCH_ENV_STDIN_SCRIPT, "sandbox-kernels-launch", cwd or "", log_path,
              _WRAPPER_ENV_FILE_SCRIPT, str(len(data)), *argv]
    result = run(transport, launch, input=data, timeout=timeout, max_output=SMALL_OUTPUT)
    pid = number(result.stdout)
    if result.exit_code != 0 or pid is None:
        raise SandboxStartError(
            f"could not start {argv[0]!r} on the sandbox (exit {result.exit_code}): "
            f"{tail_text(result.stderr) or tail_text(result.stdout) or 'no output'}"
        )
    return pid


def process_status(
    transport: paramiko.Transport, pid: int, log_path: str, timeout: float = 30.0
) -> ProcessStatus:
    """Tell whether a process from :func:`start_detached` runs, exited (with what), or is gone.

    Raises:
        SandboxConfigError: ``pid`` is not a positive process id above 1.
        SandboxError: the remote status check failed.
        SandboxTimeout, SandboxConnectionError: as for :func:`run`.
    """
    check_pid(pid)
    check_path(log_path, "log_path", absolute=True)
    script = ["sh", "-c", _STATUS_SCRIPT, "sandbox-kernels-status", str(pid), f"{log_path}.exit"]
    result = run(transport, script, timeout=timeout, max_output=SMALL_OUTPUT)
    words = result.stdout.decode(errors="replace").split()
    if result.exit_code != 0 or not words:
        raise SandboxError(f"checking process {pid} on the sandbox failed: {tail_text(result.stderr)}")
    if words[0] == "running":
        return ProcessStatus("running")
    if words == ["exited"]:
        return ProcessStatus("running")  # the wrapper is writing the file right now
    return ended(words)


def process_alive(transport: paramiko.Transport, pid: int, timeout: float = 30.0) -> bool:
    """Whether process ``pid`` exists on the remote (and is not a zombie).

    Raises:
        SandboxConfigError: ``pid`` is not above 1.
        SandboxTimeout, SandboxConnectionError: as for :func:`run`.
    """
    check_pid(pid)
    script = ["sh", "-c", _STATUS_SCRIPT, "sandbox-kernels-status", str(pid), "/nonexistent"]
    return run(transport, script, timeout=timeout, max_output=SMALL_OUTPUT).stdout.startswith(b"running")


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
    check_pid(pid)
    try:
        name = signal_module.Signals(signum).name.removeprefix("SIG")
    except ValueError as e:
        raise SandboxConfigError(f"{signum!r} is not a signal number") from e
    script = ["sh", "-c", _SIGNAL_SCRIPT, "sandbox-kernels-signal", name, str(pid)]
    result = run(transport, script, timeout=timeout, max_output=SMALL_OUTPUT)
    if result.exit_code == 0:
        return True
    if result.exit_code == 3 or not process_alive(transport, pid, timeout):
        return False
    raise SandboxError(f"sending SIG{name} to process {pid} failed: {tail_text(result.stderr)}")


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
    check_path(path, "path")
    if not 0 <= mode <= 0o7777:
        raise SandboxConfigError(f"file mode {mode!r} is not between 0 and 0o7777")
    target = path if path.startswith("/") else f"./{path}"
    script = ["sh", "-c", _WRITE_SCRIPT, "sandbox-kernels-write", target, f"{mode:o}"]
    result = run(transport, script, input=data, timeout=timeout, max_output=SMALL_OUTPUT)
    if result.exit_code != 0:
        raise SandboxError(f"writing {path} on the sandbox failed: {tail_text(result.stderr)}")


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


