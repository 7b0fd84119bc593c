"""Kernel clients for the engine suites: start a kernel, run a cell, wait on states.

Every wait here is on a state the kernel reports (ready, a marker printed, a reply), never on
a sleep: a slow guest takes longer, it does not make a test fail.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager


async def start(kernel_name: str, ksm: KernelSpecManager | None = None,
                timeout: float = 120.0) -> tuple[AsyncKernelManager, Any]:
    """Start a kernel and a ready client, or shut everything down and raise."""
    km = AsyncKernelManager(kernel_name=kernel_name,
                            **({"kernel_spec_manager": ksm} if ksm else {}))
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=timeout)
    except BaseException:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)
        raise
    return km, kc


async def run_cell(kc: Any, code: str, timeout: float = 60.0) -> dict[str, Any]:
    """Execute ``code``; collect stream text, display data, results and errors."""
    out: dict[str, Any] = {"stdout": "", "stderr": "", "display": [], "result": None, "error": None}

    def hook(msg: dict[str, Any]) -> None:
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            out[content["name"]] += content["text"]
        elif kind == "display_data":
            out["display"].append(content["data"])
        elif kind == "execute_result":
            out["result"] = content["data"].get("text/plain")
        elif kind == "error":
            out["error"] = content["ename"]

    reply = await kc.execute_interactive(code, output_hook=hook, timeout=timeout)
    out["status"] = reply["content"]["status"]
    return out


async def wait_for_output(kc: Any, msg_id: str, text: str, timeout: float) -> None:
    """Wait until the cell ``msg_id`` has printed ``text`` on stdout (read from iopub)."""
    seen = ""
    deadline = time.monotonic() + timeout
    while text not in seen:
        msg = await kc.get_iopub_msg(timeout=max(deadline - time.monotonic(), 0.1))
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream":
            seen += msg["content"]["text"]


async def run_cell_after_error(kc: Any, code: str, timeout: float = 60.0, tries: int = 20) -> dict[str, Any]:
    """:func:`run_cell` right after a cell failed: ipykernel aborts requests that arrive while
    it still clears its queue after an error; repeat an aborted one until it runs."""
    for _ in range(tries):
        out = await run_cell(kc, code, timeout=timeout)
        if out["status"] != "aborted":
            return out
    raise AssertionError(f"{tries} requests in a row were aborted after an error")


async def wait_until(predicate: Callable[[], Awaitable[bool]], timeout: float, step: float = 0.2) -> bool:
    """Poll an async predicate until it holds or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(step)
    return False
