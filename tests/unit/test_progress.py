"""Progress reports and run_step: typed errors naming the step, output tails, no shell."""

from __future__ import annotations

import io
import sys

import pytest

from sandbox_kernels.errors import SandboxError, SandboxTimeout
from sandbox_kernels.progress import Progress, run_step


def test_progress_writes_lines_when_not_a_terminal() -> None:
    out = io.StringIO()
    progress = Progress("image", 2, stream=out)
    progress.step("download")
    progress.detail("50%")  # details only redraw a terminal's bar
    progress.step("unpack")
    progress.finish("ready")
    lines = out.getvalue().splitlines()
    assert [line.split(" (")[0] for line in lines] == [
        "[image] step 1/2: download", "[image] step 2/2: unpack", "[image] ready"]


def test_run_step_returns_the_output_tail_and_feeds_lines() -> None:
    seen: list[str] = []
    text = run_step([sys.executable, "-c", "for i in range(100): print(i)"], step="count", timeout=30,
                    on_line=seen.append)
    assert seen == [str(i) for i in range(100)]
    assert text.splitlines() == [str(i) for i in range(40, 100)]


def test_run_step_passes_input_and_takes_no_shell() -> None:
    text = run_step([sys.executable, "-c", "import sys; print(sys.stdin.read().upper())"], step="upper",
                    timeout=30, input=b"$(id); `id`")
    assert text == "$(ID); `ID`"


def test_run_step_failure_names_the_step_and_shows_the_output() -> None:
    with pytest.raises(SandboxError, match=r"step 'build' failed \(exit 3\)") as info:
        run_step([sys.executable, "-c", "print('compiler said no'); raise SystemExit(3)"], step="build", timeout=30)
    assert "compiler said no" in str(info.value)
    assert not isinstance(info.value, SandboxTimeout)


def test_run_step_timeout_is_a_typed_timeout() -> None:
    with pytest.raises(SandboxTimeout, match=r"step 'wait' timed out after 0.5 s") as info:
        run_step([sys.executable, "-c", "print('started', flush=True); import time; time.sleep(30)"],
                 step="wait", timeout=0.5)
    assert isinstance(info.value, TimeoutError) and "started" in str(info.value)
