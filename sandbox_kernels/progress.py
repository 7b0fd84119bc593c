"""Progress for long work (image builds, VM boots): a bar on a terminal, log lines otherwise.

Each step runs with a time limit and, when it is exceeded, fails with a message that names
the step and the limit.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from typing import IO, Callable, Sequence

from .errors import SandboxError, SandboxTimeout

log = logging.getLogger("sandbox_kernels")


class Progress:
    """Reports steps ``k/n`` of a named job; redraws a bar on a TTY, logs lines elsewhere."""

    def __init__(self, job: str, steps: int, stream: IO[str] | None = None) -> None:
        self.job = job
        self.steps = max(steps, 1)
        self.done = 0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._start = time.monotonic()
        self._step_name = ""

    def step(self, name: str) -> None:
        """Begin the next step."""
        if self._step_name:
            self.done += 1
        self._step_name = name
        self._show(name)

    def detail(self, text: str) -> None:
        """Update the current step's detail (a line of a tool's output)."""
        if self.tty:
            self._show(f"{self._step_name}: {text}")

    def finish(self, summary: str) -> None:
        """End the job with a one-line summary."""
        self.done = self.steps
        elapsed = time.monotonic() - self._start
        if self.tty:
            self.stream.write("\r\033[K")
        self.stream.write(f"[{self.job}] {summary} ({elapsed:.0f} s)\n")
        self.stream.flush()

    def _show(self, text: str) -> None:
        elapsed = time.monotonic() - self._start
        if self.tty:
            width = 24
            filled = int(width * self.done / self.steps)
            bar = "#" * filled + "-" * (width - filled)
            line = f"\r\033[K[{self.job}] [{bar}] {self.done + 1}/{self.steps} {text[:70]} {elapsed:4.0f}s"
            self.stream.write(line)
        else:
            self.stream.write(f"[{self.job}] step {self.done + 1}/{self.steps}: {text} ({elapsed:.0f} s)\n")
        self.stream.flush()


def run_step(
    argv: Sequence[str],
    *,
    step: str,
    timeout: float,
    progress: Progress | None = None,
    on_line: Callable[[str], None] | None = None,
    input: bytes | None = None,
    env: dict[str, str] | None = None,
) -> str:
    """Run ``argv`` (never through a shell), streaming its output to ``progress``.

    Returns:
        The last 60 lines of the command's output.

    Raises:
        SandboxTimeout: the command ran longer than ``timeout`` seconds (it is killed).
        SandboxError: the command failed; the message holds its output tail.
    """
    proc = subprocess.Popen(
        list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL, env=env,
    )
    tail: list[str] = []
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        if input is not None:
            assert proc.stdin is not None
            proc.stdin.write(input)
            proc.stdin.close()
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            tail = (tail + [line])[-60:]
            if progress:
                progress.detail(line)
            if on_line:
                on_line(line)
        code = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        timed_out = not timer.is_alive() and proc.returncode is not None and proc.returncode < 0
        timer.cancel()
    text = "\n".join(tail)
    if timed_out:
        raise SandboxTimeout(f"step '{step}' timed out after {timeout:g} s. Last output:\n{text}")
    if code != 0:
        raise SandboxError(f"step '{step}' failed (exit {code}): {argv[0]}. Last output:\n{text}")
    return text
