"""Start/stop cycles with a leak check: the load part every runtime's suite shares."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from helpers.kernels import run_cell, start, wait_until


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


async def cycles_leave_nothing(kernel: str, n: int, timeout: float) -> None:
    """``n`` start/execute/stop cycles of ``kernel``; then no listening port, file descriptor,
    tunnel thread or per-kernel state directory beyond the baseline taken after one warm-up
    cycle."""
    await _cycles(kernel, 1, timeout)  # warm imports and caches before the baseline
    state_root = Path(os.environ["SANDBOX_KERNELS_STATE_DIR"])
    assert state_root.is_dir(), "a started kernel creates the state root: the check below needs it"
    ports, fds, threads, states = _listening_ports(), _fds(), _sandbox_threads(), _entries(state_root)
    started = time.monotonic()
    await _cycles(kernel, n, timeout)
    print(f"{kernel}: {n} cycles in {time.monotonic() - started:.1f} s")

    async def settled() -> bool:  # tunnel threads and sockets close just after shutdown returns
        return (_listening_ports() <= ports and _fds() <= fds + 5 and _sandbox_threads() == threads
                and _entries(state_root) <= states)

    await wait_until(settled, timeout=10)
    assert _listening_ports() <= ports, "listening ports left behind"
    assert _fds() <= fds + 5, f"file descriptors grew from {fds} to {_fds()}"
    assert _sandbox_threads() == threads
    assert _entries(state_root) <= states, f"state directories left: {_entries(state_root) - states}"


def _entries(root: Path) -> set[str]:
    return {p.name for p in root.iterdir()}
