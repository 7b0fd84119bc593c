"""Detached processes, files and signals on a sandbox over an existing SSH transport.

Commands run through :func:`sandbox_kernels.ssh.runner.run` (re-exported here): user-controlled
values never become shell syntax; the shell scripts (:mod:`sandbox_kernels.remote.scripts`,
shared with the Kubernetes exec shell) are constants that read their data from positional
parameters (``"$1"``, ``"$@"``). Environment variable names are checked
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

import signal as signal_module
from collections.abc import Mapping, Sequence

import paramiko

from ..errors import SandboxConfigError, SandboxError, SandboxStartError
from ..remote.scripts import (
    ENV_NAME,
    LAUNCH_ENV_STDIN,
    MAX_ENV_BYTES,
    SIGNAL,
    STATUS,
    WRAPPER_ENV_FILE,
    WRITE,
    env_file,
)
from .runner import DEFAULT_MAX_OUTPUT, SMALL_OUTPUT, CommandResult, check_path, quote_argv, run, tail_text
from .status import ProcessStatus, ProcessWatch, check_pid, ended, number, parse_int, watch_process

__all__ = ["DEFAULT_MAX_OUTPUT", "ENV_NAME", "MAX_ENV_BYTES", "CommandResult", "ProcessStatus",
           "ProcessWatch", "env_file", "parse_int", "process_alive", "process_status", "quote_argv", "run", "send_signal",
           "start_detached", "watch_process", "write_file"]


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
    launch = ["sh", "-c", LAUNCH_ENV_STDIN, "sandbox-kernels-launch", cwd or "", log_path,
              WRAPPER_ENV_FILE, str(len(data)), *argv]
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
    script = ["sh", "-c", STATUS, "sandbox-kernels-status", str(pid), f"{log_path}.exit"]
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
    script = ["sh", "-c", STATUS, "sandbox-kernels-status", str(pid), "/nonexistent"]
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
    script = ["sh", "-c", SIGNAL, "sandbox-kernels-signal", name, str(pid)]
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
    script = ["sh", "-c", WRITE, "sandbox-kernels-write", target, f"{mode:o}"]
    result = run(transport, script, input=data, timeout=timeout, max_output=SMALL_OUTPUT)
    if result.exit_code != 0:
        raise SandboxError(f"writing {path} on the sandbox failed: {tail_text(result.stderr)}")
