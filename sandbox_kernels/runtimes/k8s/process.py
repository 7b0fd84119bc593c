"""The :class:`~sandbox_kernels.remote.shell.Shell` of a pod: commands run through exec.

The same shell scripts as over SSH (:mod:`sandbox_kernels.remote.scripts`) do the work:
user values are positional parameters of constant scripts, never shell syntax. The
kernel runs detached under a wrapper that records its exit status, re-parented to the pod's
init, so it outlives the exec call, and a restart only replaces this process, not the pod.

All functions block; call them through ``to_thread``.
"""

from __future__ import annotations

import re
import signal as signal_module
from collections.abc import Mapping, Sequence

from ...errors import SandboxConfigError, SandboxError, SandboxStartError
from ...remote import scripts
from ...remote.shell import ProcessStatus
from ...ssh.runner import quote_argv
from .api import ExecResult, KubeAPI
from .exec_stream import MAX_OUTPUT

#: The most read back from commands whose answer is a word or a log tail.
_SMALL_OUTPUT = 64 << 10
_NUMBER = re.compile(r"[0-9]{1,9}")


class PodProcess:
    """Exec-based process control in one pod's container (a :class:`Shell`; no push watch).

    Args:
        api: the API wrapper.
        pod: the pod name.
    """

    def __init__(self, api: KubeAPI, pod: str):
        self.api = api
        self.pod = pod

    #: An exec channel is opened per command: it is never lost for good.
    gave_up = False

    def run(self, argv: Sequence[str], input: bytes | None = None, timeout: float = 30.0,
            max_output: int = MAX_OUTPUT) -> ExecResult:
        """Run ``argv`` in the pod (see :meth:`KubeAPI.exec`); at most ``max_output`` bytes of output.

        Raises:
            SandboxError: more output than ``max_output``, or the exec failed.
        """
        quote_argv(argv)  # the same checks as over SSH: a non-empty list of strings
        return self.api.exec(self.pod, argv, input, timeout, limit=max_output)

    def write_file(self, path: str, data: bytes, mode: int = 0o600, timeout: float = 30.0) -> None:
        """Write ``data`` to ``path`` in the pod atomically with ``mode``.

        Raises:
            SandboxError: the write failed (message has the pod's stderr).
        """
        script = ["sh", "-c", scripts.WRITE_SIZED, "sandbox-kernels-write", path, f"{mode:o}", str(len(data))]
        result = self.run(script, data, timeout)
        if result.exit_code != 0:
            raise SandboxError(f"writing {path} in pod {self.pod} failed: {_tail(result.stderr)}")

    def start_detached(self, argv: Sequence[str], log_path: str, env: Mapping[str, str] | None = None,
                       cwd: str | None = None, timeout: float = 30.0) -> int:
        """Start ``argv`` in a new session with its output in ``log_path`` and its exit status
        recorded in ``<log_path>.exit``.

        Returns:
            The pid of the wrapper, which leads the process group.

        Raises:
            SandboxConfigError: a bad command or environment name.
            SandboxStartError: the process could not be started.
        """
        quote_argv(argv)
        words = scripts.env_words(env or {})
        launch = ["sh", "-c", scripts.LAUNCH_ARGV, "sandbox-kernels-launch", cwd or "", log_path,
                  scripts.WRAPPER_ARGV, str(len(words)), *words, *argv]
        result = self.run(launch, None, timeout, _SMALL_OUTPUT)
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
        script = ["sh", "-c", scripts.STATUS, "sandbox-kernels-status", str(pid), f"{log_path}.exit"]
        result = self.run(script, None, timeout, _SMALL_OUTPUT)
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
        script = ["sh", "-c", scripts.SIGNAL, "sandbox-kernels-signal", name, str(pid)]
        result = self.run(script, None, timeout, _SMALL_OUTPUT)
        if result.exit_code == 0:
            return True
        if result.exit_code == 3:
            return False
        raise SandboxError(f"sending SIG{name} to process {pid} in pod {self.pod} failed: "
                           f"{_tail(result.stderr)}")

    def watch(self, pid: int, log_path: str, timeout: float = 30.0) -> None:
        """None: exec has no cheap push-style watch; callers ask :meth:`status`."""
        return None

    def tail(self, path: str, max_bytes: int = _SMALL_OUTPUT, lines: int = 30, timeout: float = 15.0) -> str:
        """The last ``lines`` lines of a file in the pod, at most ``max_bytes`` of them (a
        message in brackets if it cannot be read)."""
        try:
            result = self.run(["sh", "-c", scripts.TAIL, "sandbox-kernels-tail", str(lines), path,
                               str(max_bytes)], None, timeout, max_bytes * 2)
        except SandboxError as e:
            return f"(unavailable: {e})"
        return result.stdout.decode(errors="replace")


def _check_pid(pid: int) -> None:
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 1:
        raise SandboxConfigError(f"{pid!r} is not a process id this can address (must be > 1)")


def _tail(data: bytes, limit: int = 500) -> str:
    text = data.decode(errors="replace").strip()
    return text if len(text) <= limit else f"...{text[-limit:]}"
