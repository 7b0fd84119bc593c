"""Load: repeated start/stop with a leak check, a flooding kernel beside a quiet one, ten VM
kernels behind two slots.

Bounded loops; the VM cycle count is smaller by default because each VM boots under TCG here
(``SANDBOX_KERNELS_SOAK_VM_CYCLES`` raises it, ``make soak`` sets 50). The SSH and Kubernetes
cycles live beside their fixtures (test_ssh_host.py, test_k8s.py).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import pytest

from helpers.cycles import cycles_leave_nothing
from helpers.kernels import run_cell, start

pytestmark = pytest.mark.slow


@pytest.mark.docker
@pytest.mark.parametrize("kernel,cycles_env,default,timeout", [
    ("sandbox-docker", "SANDBOX_KERNELS_SOAK_DOCKER_CYCLES", 50, 60),
    pytest.param("sandbox-nixos-vm", "SANDBOX_KERNELS_SOAK_VM_CYCLES", 5, 300, marks=pytest.mark.vm),
])
async def test_start_stop_cycles_leave_nothing(kernel: str, cycles_env: str, default: int, timeout: float) -> None:
    await cycles_leave_nothing(kernel, int(os.environ.get(cycles_env, default)), timeout)


@pytest.mark.docker
async def test_flooding_kernel_does_not_stall_another() -> None:
    """A tight print loop in one kernel; a second kernel still answers each cell in interactive
    time (a few seconds, not the 30 s cell timeout) while the first is still flooding."""
    noisy_km, noisy = await start("sandbox-docker", timeout=60)
    quiet_km, quiet = await start("sandbox-docker", timeout=60)
    try:
        flood = noisy.execute("import itertools\nfor i in itertools.count():\n    print(i)")
        await _flooding(noisy, flood)
        latencies = []
        for _ in range(5):
            t = time.monotonic()
            out = await run_cell(quiet, "print('pong')", timeout=30)
            latencies.append(time.monotonic() - t)
            assert out["stdout"] == "pong\n"
        print(f"quiet kernel round trips while the other floods: {[round(x, 3) for x in latencies]}")
        assert max(latencies) < INTERACTIVE, f"the quiet kernel stalled: {latencies}"
        await noisy_km.interrupt_kernel()
        reply = await noisy.get_shell_msg(timeout=60)
        while reply["parent_header"].get("msg_id") != flood:
            reply = await noisy.get_shell_msg(timeout=60)
        assert reply["content"].get("ename") == "KeyboardInterrupt", "the flood ran until interrupted"
    finally:
        for km, kc in ((noisy_km, noisy), (quiet_km, quiet)):
            kc.stop_channels()
            await km.shutdown_kernel(now=True)


#: Seconds a one-line cell may take to count as answered at once (the 30 s timeout is not it).
INTERACTIVE = 5.0


async def _flooding(kc: Any, msg_id: str) -> None:
    """Wait until the flooding cell ``msg_id`` prints (it runs: the measurement may begin)."""
    while True:
        msg = await kc.get_iopub_msg(timeout=30)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        assert msg["msg_type"] != "status" or msg["content"]["execution_state"] != "idle", "the flood ended"
        if msg["msg_type"] == "stream":
            return


@pytest.mark.vm
def test_ten_kernels_at_once_with_two_vm_slots(jp_asyncio_loop: Any) -> None:
    """Ten VM kernels requested together with NIXOS_MAX_CONCURRENT_VMS=2: all run, each its own
    cell, and never more than two are up at once."""
    n = int(os.environ.get("SANDBOX_KERNELS_SOAK_QUEUE_KERNELS", 10))
    os.environ["NIXOS_MAX_CONCURRENT_VMS"] = "2"

    async def one(i: int) -> tuple[float, float]:
        km, kc = await start("sandbox-nixos-vm", timeout=3600)
        up = time.monotonic()  # from here to shutdown this kernel holds a slot
        try:
            out = await run_cell(kc, f"print({i})", timeout=120)
            assert out["stdout"] == f"{i}\n"
            return up, time.monotonic()
        finally:
            kc.stop_channels()
            await km.shutdown_kernel(now=True)

    try:
        spans = jp_asyncio_loop.run_until_complete(asyncio.gather(*(one(i) for i in range(n))))
    finally:
        os.environ.pop("NIXOS_MAX_CONCURRENT_VMS", None)
    most = max(sum(1 for a, b in spans if a <= t < b) for t, _ in spans)
    assert most <= 2, f"{most} VM kernels ran at once with two slots"
