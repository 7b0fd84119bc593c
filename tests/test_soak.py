"""Load: repeated start/stop with a leak check, a flooding kernel beside a quiet one.

Bounded loops; the VM cycle count is smaller by default because each VM boots under TCG here
(``SANDBOX_KERNELS_SOAK_VM_CYCLES`` raises it, ``make soak`` sets 50).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from lifecycle import run_cell, start

pytestmark = pytest.mark.slow


def _listening_ports() -> set[str]:
    """TCP listeners owned by this process (others on the machine are not our concern)."""
    ours = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            ours.add(target[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in ours:  # LISTEN, inode is one of ours
                    found.add(fields[1])
    return found


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _sandbox_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("sandbox-ssh")]


async def _cycles(kernel: str, n: int, timeout: float) -> None:
    for i in range(n):
        km, kc = await start(kernel, timeout=timeout)
        out = await run_cell(kc, f"print({i} * 2)")
        assert out["stdout"] == f"{i * 2}\n"
        kc.stop_channels()
        await km.shutdown_kernel()


@pytest.mark.docker
@pytest.mark.parametrize("kernel,cycles_env,default,timeout", [
    ("sandbox-docker", "SANDBOX_KERNELS_SOAK_DOCKER_CYCLES", 50, 60),
    pytest.param("sandbox-nixos-vm", "SANDBOX_KERNELS_SOAK_VM_CYCLES", 5, 300, marks=pytest.mark.vm),
])
async def test_start_stop_cycles_leave_nothing(kernel: str, cycles_env: str, default: int, timeout: float) -> None:
    await _cycles(kernel, 1, timeout)  # warm imports and caches before the baseline
    ports, fds, threads = _listening_ports(), _fds(), _sandbox_threads()
    n = int(os.environ.get(cycles_env, default))
    started = time.monotonic()
    await _cycles(kernel, n, timeout)
    print(f"{kernel}: {n} cycles in {time.monotonic() - started:.1f} s")
    await asyncio.sleep(1)
    assert _listening_ports() <= ports, "listening ports left behind"
    assert _fds() <= fds + 5, f"file descriptors grew from {fds} to {_fds()}"
    assert _sandbox_threads() == threads
    state = Path(os.environ["SANDBOX_KERNELS_STATE_DIR"])
    assert not list(state.glob("*")) if state.exists() else True


@pytest.mark.docker
async def test_flooding_kernel_does_not_stall_another() -> None:
    """A tight print loop in one kernel; a second kernel still answers quickly."""
    noisy_km, noisy = await start("sandbox-docker", timeout=60)
    quiet_km, quiet = await start("sandbox-docker", timeout=60)
    try:
        noisy.execute("import itertools\nfor i in itertools.count():\n    print(i)")
        await asyncio.sleep(2)
        latencies = []
        for _ in range(5):
            t = time.monotonic()
            out = await run_cell(quiet, "print('pong')", timeout=30)
            latencies.append(time.monotonic() - t)
            assert out["stdout"] == "pong\n"
        print(f"quiet kernel round trips while the other floods: {[round(x, 3) for x in latencies]}")
        await noisy_km.interrupt_kernel()
    finally:
        for km, kc in ((noisy_km, noisy), (quiet_km, quiet)):
            kc.stop_channels()
            await km.shutdown_kernel(now=True)


@pytest.mark.vm
def test_ten_kernels_at_once_with_two_vm_slots(jp_asyncio_loop: Any) -> None:
    """Ten VM kernels requested together with NIXOS_MAX_CONCURRENT_VMS=2: all run, none fail."""
    n = int(os.environ.get("SANDBOX_KERNELS_SOAK_QUEUE_KERNELS", 10))
    os.environ["NIXOS_MAX_CONCURRENT_VMS"] = "2"

    async def one(i: int) -> float:
        km, kc = await start("sandbox-nixos-vm", timeout=3600)
        try:
            out = await run_cell(kc, f"print({i})", timeout=120)
            assert out["stdout"] == f"{i}\n"
            return time.monotonic()
        finally:
            kc.stop_channels()
            await km.shutdown_kernel(now=True)

    try:
        finished = jp_asyncio_loop.run_until_complete(asyncio.gather(*(one(i) for i in range(n))))
    finally:
        os.environ.pop("NIXOS_MAX_CONCURRENT_VMS", None)
    assert len(finished) == n
