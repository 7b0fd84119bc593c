"""The kernel process inside the pod, run, watched and signalled through exec.

The same small shell scripts as the SSH runtime (:mod:`sandbox_kernels.ssh.remote`) do the
work: user values are positional parameters of constant scripts, never shell syntax. The
kernel runs detached under a wrapper that records its exit status, re-parented to the pod's
init, so it outlives the exec call, and a restart only replaces this process, not the pod.

All functions block; call them through ``to_thread``.
"""

from __future__ import annotations

import re
import signal as signal_module
from collections.abc import Mapping, Sequence

from ...errors import SandboxConfigError, SandboxError, SandboxStartError
from ...ssh import remote
from ...ssh.remote import ProcessStatus
from .api import ExecResult, KubeAPI
from .exec_stream import MAX_OUTPUT

#: The most read back from commands whose answer is a word or a log tail.
_SMALL_OUTPUT = 64 << 10
_NUMBER = re.compile(r"[0-9]{1,9}")
_TAIL_SCRIPT = 'tail -n "$1" -- "$2" | tail -c "$3"'

# $1 target path, $2 octal mode, $3 byte count; the bytes on stdin (an exec stream may not
# carry an end-of-file, so exactly $3 bytes are read). Written 0600, then renamed.
_WRITE_SCRIPT = """\
umask 077
tmp=$(mktemp "$1.XXXXXX") || exit 1
head -c "$3" >"$tmp" && [ "$(wc -c <"$tmp")" -eq "$3" ] && chmod "$2" "$tmp" && mv -f -- "$tmp" "$1" && exit 0
rc=$?
rm -f -- "$tmp"
exit "$rc"
"""


class PodProcess:
    """Exec-based process control in one pod's container.

    Args:
        api: the API wrapper.
        pod: the pod name.
    """

    def __init__(self, api: KubeAPI, pod: str):
        self.api = api
        self.pod = pod

    def run(self, argv: Sequence[str], stdin: bytes | None = None, timeout: float = 30.0,
            limit: int = MAX_OUTPUT) -> ExecResult:
        """Run ``argv`` in the pod (see :meth:`KubeAPI.exec`); at most ``limit`` bytes of output.

        Raises:
            SandboxError: more output than ``limit``, or the exec failed.
        """
        remote.quote_argv(argv)  # the same checks as over SSH: a non-empty list of strings
        return self.api.exec(self.pod, argv, stdin, timeout, limit=limit)

    def write_file(self, path: str, data: bytes, mode: int = 0o600, timeout: float = 30.0) -> None:
        """Write ``data`` to ``path`` in the pod atomically with ``mode``.

        Raises:
            SandboxError: the write failed (message has the pod's stderr).
        """
        script = ["sh", "-c", _WRITE_SCRIPT, "sandbox-kernels-write", path, f"{mode:o}", str(len(data))]
        result = self.run(script, stdin=data, timeout=timeout)
        if result.exit_code != 0:
            raise SandboxError(f"writing {path} in pod {self.pod} failed: {_tail(result.stderr)}")

    def start_detached(self, argv: Sequence[str], log_path: str, env: Mapping[str, str],
                       cwd: str | None = None, timeout: float = 30.0) -> int:
        """Start ``argv`` in a new session with its output in ``log_path`` and its exit status
        recorded in ``<log_path>.exit``.

        Returns:
            The pid of the wrapper, which leads the process group.

        Raises:
            SandboxConfigError: a bad command or environment name.
            SandboxStartError: the process could not be started.
        """
        remote.quote_argv(argv)
        words = remote._env_words(env)
        launch = ["sh", "-c", remote._LAUNCH_SCRIPT, "sandbox-kernels-launch", cwd or "", log_path,
                  remote._WRAPPER_SCRIPT, str(len(words)), *words, *argv]
        result = self.run(launch, timeout=timeout, limit=_SMALL_OUTPUT)
        text = result.stdout.decode(errors="replace").strip()
        if result.exit_code != 0 or not _NUMBER.fullmatch(text):
            raise SandboxStartError(
                f"could not start {argv[0]!r} in pod {self.pod} (exit {result.exit_code}): "
                f"{_tail(result.stderr) or _tail(result.stdout) or 'no output'}")
        return int(text)

    def status(self, pid: int, log_path: str, timeout: float = 30.0) -> ProcessStatus:
        """Running, exited (with its code) or gone.

        Raises:
            SandboxError: the check itself failed.
        """
        _check_pid(pid)
        script = ["sh", "-c", remote._STATUS_SCRIPT, "sandbox-kernels-status", str(pid), f"{log_path}.exit"]
        result = self.run(script, timeout=timeout, limit=_SMALL_OUTPUT)
        words = result.stdout.decode(errors="replace").split()
        if result.exit_code != 0 or not words:
            raise SandboxError(f"checking process {pid} in pod {self.pod} failed: {_tail(result.stderr)}")
        if words[0] == "running" or (words[0] == "exited" and len(words) != 2):
            return ProcessStatus("running")
        if words[0] == "exited" and _NUMBER.fullmatch(words[1]):
            return ProcessStatus("exited", int(words[1]))
        return ProcessStatus("gone")

    def signal(self, pid: int, signum: int, timeout: float = 30.0) -> bool:
        """Send ``signum`` (by name) to the process group led by ``pid``.

        Returns:
            False if no such process runs.

        Raises:
            SandboxConfigError: not a signal.
            SandboxError: ``kill`` failed for another reason.
        """
        _check_pid(pid)
        try:
            name = signal_module.Signals(signum).name.removeprefix("SIG")
        except ValueError as e:
            raise SandboxConfigError(f"{signum!r} is not a signal number") from e
        script = ["sh", "-c", remote._SIGNAL_SCRIPT, "sandbox-kernels-signal", name, str(pid)]
        result = self.run(script, timeout=timeout, limit=_SMALL_OUTPUT)
        if result.exit_code == 0:
            return True
        if result.exit_code == 3:
            return False
        raise SandboxError(f"sending SIG{name} to process {pid} in pod {self.pod} failed: "
                           f"{_tail(result.stderr)}")

    def tail(self, path: str, lines: int = 30, timeout: float = 15.0) -> str:
        """The last ``lines`` lines of a file in the pod, at most 64 KiB of them ('' if it
        cannot be read)."""
        try:
            result = self.run(["sh", "-c", _TAIL_SCRIPT, "sandbox-kernels-tail", str(lines), path,
                               str(_SMALL_OUTPUT)], timeout=timeout, limit=_SMALL_OUTPUT * 2)
        except SandboxError as e:
            return f"(unavailable: {e})"
        return result.stdout.decode(errors="replace")


def _check_pid(pid: int) -> None:
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 1:
        raise SandboxConfigError(f"{pid!r} is not a process id this can address (must be > 1)")


def _tail(data: bytes, limit: int = 500) -> str:
    text = data.decode(errors="replace").strip()
    return text if len(text) <= limit else f"...{text[-limit:]}"
