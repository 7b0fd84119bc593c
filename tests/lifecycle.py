"""The lifecycle suite every runtime passes (like fsspec's ``tests/abstract``).

A runtime's test module subclasses :class:`LifecycleSuite` and supplies a :class:`Runtime`
through the ``runtime`` fixture: the kernel name, and how to find, break or remove its sandbox
from outside. Nothing here knows about Docker, libvirt, Kubernetes or SSH.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
from jupyter_client.ioloop.restarter import AsyncIOLoopKernelRestarter
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

from helpers.kernels import run_cell, run_cell_after_error, start, wait_for_output, wait_until
from sandbox_kernels.errors import SandboxConfigError

# The runtimes' suites import the client helpers from here too (they live in helpers/kernels.py).
__all__ = ["LifecycleSuite", "Runtime", "run_cell", "start", "wait_until", "REPO"]

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


@dataclass
class Runtime:
    """What the suite needs to know about one runtime."""

    kernel_name: str
    #: Does a sandbox for this kernel id exist right now (container, domain, pod, remote dir)?
    sandbox_exists: Callable[[str], bool]
    #: Remove/destroy the kernel's sandbox from outside, as an operator or a crash would.
    destroy_externally: Callable[[str], None]
    #: Settings that must fail, each with a word the error must contain (the setting name).
    bad_settings: list[tuple[dict[str, Any], str]] = field(default_factory=list)
    #: Seconds a start may take on this machine (for client waits, not assertions of speed).
    start_timeout: float = 120.0
    #: Seconds one small cell may take (a TCG guest on a loaded machine is slow).
    exec_timeout: float = 60.0


class LifecycleSuite:
    """Start, execute, outputs, interrupt, restart, death detection, shutdown, papermill."""

    @pytest.fixture
    def runtime(self) -> Runtime:  # pragma: no cover - supplied by subclasses
        raise NotImplementedError

    @pytest.fixture
    def kernel(self, runtime: Runtime, jp_asyncio_loop: Any) -> Any:
        km, kc = jp_asyncio_loop.run_until_complete(
            start(runtime.kernel_name, timeout=runtime.start_timeout))
        try:
            yield km, kc
        finally:
            kc.stop_channels()
            jp_asyncio_loop.run_until_complete(km.shutdown_kernel(now=True))
            assert not runtime.sandbox_exists(km.kernel_id), "sandbox left after shutdown"

    async def test_execute_and_outputs(self, kernel: Any, runtime: Runtime) -> None:
        _, kc = kernel
        out = await run_cell(
            kc,
            "import sys\nfrom IPython.display import display, HTML\n"
            "print('to stdout'); print('to stderr', file=sys.stderr)\n"
            "display(HTML('<b>rich</b>'))\n6 * 7",
            timeout=runtime.exec_timeout,
        )
        assert out["status"] == "ok"
        assert out["stdout"] == "to stdout\n"
        assert out["stderr"] == "to stderr\n"
        assert out["display"][0]["text/html"] == "<b>rich</b>"
        assert out["result"] == "42"
        err = await run_cell(kc, "1/0", timeout=runtime.exec_timeout)
        assert err["status"] == "error" and err["error"] == "ZeroDivisionError"

    async def test_runs_in_the_sandbox(self, kernel: Any, runtime: Runtime) -> None:
        km, kc = kernel
        assert runtime.sandbox_exists(km.kernel_id)
        out = await run_cell(kc, "import os, socket; print(socket.gethostname(), os.getuid())",
                             timeout=runtime.exec_timeout)
        host, uid = out["stdout"].split()
        assert host != os.uname().nodename
        assert uid != "0", "the kernel must not run as root in the sandbox"

    async def test_interrupt(self, kernel: Any, runtime: Runtime) -> None:
        km, kc = kernel
        msg_id = kc.execute("print('sleeping', flush=True); import time; time.sleep(600)")
        # Interrupt only once the cell runs (a slow guest may take seconds to get there).
        await wait_for_output(kc, msg_id, "sleeping\n", timeout=runtime.exec_timeout)
        await km.interrupt_kernel()
        reply = await kc.get_shell_msg(timeout=30)
        while reply["parent_header"].get("msg_id") != msg_id:
            reply = await kc.get_shell_msg(timeout=30)
        # Within 30 s of a 600 s sleep: only the interrupt can have ended it.
        assert reply["content"]["status"] == "error"
        assert reply["content"]["ename"] == "KeyboardInterrupt"
        after = await run_cell_after_error(kc, "print('alive')", timeout=runtime.exec_timeout)
        assert after["stdout"] == "alive\n", after

    async def test_restart_resets_state(self, kernel: Any, runtime: Runtime) -> None:
        km, kc = kernel
        await run_cell(kc, "x = 41", timeout=runtime.exec_timeout)
        await km.restart_kernel(now=False)
        await kc.wait_for_ready(timeout=runtime.start_timeout)
        out = await run_cell(kc, "print('x' in globals())", timeout=runtime.exec_timeout)
        assert out["stdout"] == "False\n"
        assert (await run_cell(kc, "print(1 + 1)", timeout=runtime.exec_timeout))["stdout"] == "2\n"
        assert runtime.sandbox_exists(km.kernel_id)

    async def test_kernel_death_detected_and_auto_restarted(self, kernel: Any, runtime: Runtime) -> None:
        km, kc = kernel
        restarts: list[str] = []
        restarter = AsyncIOLoopKernelRestarter(kernel_manager=km, time_to_dead=1.0, parent=km)
        restarter.add_callback(lambda: restarts.append("restart"), "restart")
        restarter.start()
        try:
            kc.execute("import os; os._exit(3)")
            # The restart callback fires only once the restarter's poll saw the kernel dead.
            assert await wait_until(lambda: _truthy(restarts), timeout=runtime.start_timeout), \
                "kernel death was not detected"
            await kc.wait_for_ready(timeout=runtime.start_timeout)
            back = await run_cell(kc, "print('back')", timeout=runtime.exec_timeout)
            assert back["stdout"] == "back\n"
        finally:
            restarter.stop()

    async def test_sandbox_removed_from_outside_detected(self, kernel: Any, runtime: Runtime) -> None:
        km, _ = kernel
        runtime.destroy_externally(km.kernel_id)
        assert await wait_until(lambda: _false(km), timeout=10), "a removed sandbox must poll dead"

    async def test_shutdown_leaves_nothing(self, runtime: Runtime) -> None:
        km, kc = await start(runtime.kernel_name, timeout=runtime.start_timeout)
        kid = km.kernel_id
        kc.stop_channels()
        await km.shutdown_kernel()
        assert not runtime.sandbox_exists(kid)
        state_root = Path(os.environ["SANDBOX_KERNELS_STATE_DIR"])
        assert not (state_root / kid).exists(), "per-kernel state directory left behind"

    async def test_bad_settings_name_the_setting(self, runtime: Runtime, kernelspec_dir: Any) -> None:
        for config, word in runtime.bad_settings:
            kdir = kernelspec_dir(runtime.kernel_name, name="bad", **config)
            ksm = KernelSpecManager(kernel_dirs=[str(kdir)])
            km = AsyncKernelManager(kernel_name="bad", kernel_spec_manager=ksm)
            with pytest.raises(SandboxConfigError) as info:
                await km.start_kernel()
            assert word in str(info.value), f"{config}: {info.value}"
            assert not km.has_kernel

    def test_papermill_cli(self, runtime: Runtime, tmp_path: Path) -> None:
        out = tmp_path / "out.ipynb"
        proc = subprocess.run(
            [str(VENV_BIN / "papermill"), "-k", runtime.kernel_name,
             str(REPO / "tests" / "notebooks" / "smoke.ipynb"), str(out), "-p", "n", "5"],
            capture_output=True, text=True, timeout=runtime.start_timeout + 120,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        nb = json.loads(out.read_text())
        texts = ["".join(o.get("text", "")) for c in nb["cells"] for o in c.get("outputs", [])]
        assert "sum=15" in "".join(texts)


async def _false(km: AsyncKernelManager) -> bool:
    return not await km.is_alive()


async def _truthy(items: list[str]) -> bool:
    return bool(items)
