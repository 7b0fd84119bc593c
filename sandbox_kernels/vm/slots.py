"""``NIXOS_MAX_CONCURRENT_VMS`` as a queue: VM slots are lock files shared by all processes.

A kernel holds one slot (an exclusive ``flock`` on ``slot-<n>.lock``) for its VM's lifetime;
the kernel that finds every slot taken waits and says so in the log. Locks vanish with their
process, so a crashed server never leaks a slot.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import time
from pathlib import Path

from ..errors import SandboxTimeout


class VMSlot:
    """One held slot; :meth:`release` (idempotent) frees it."""

    def __init__(self, fd: int, path: Path) -> None:
        self._fd: int | None = fd
        self.path = path

    def release(self) -> None:
        """Free the slot."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def try_acquire_slot(directory: Path, limit: int) -> VMSlot | None:
    """Take one of ``limit`` slots in ``directory`` if one is free, without waiting."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    for n in range(limit):
        path = directory / f"slot-{n}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return VMSlot(fd, path)
    return None


async def acquire_slot(directory: Path, limit: int, timeout: float, log: logging.Logger,
                       who: str) -> VMSlot:
    """Take one of ``limit`` slots, waiting in line (asynchronously) up to ``timeout`` seconds.

    Raises:
        SandboxTimeout: no slot became free in time.
    """
    deadline = time.monotonic() + timeout
    announced = False
    while True:
        slot = try_acquire_slot(directory, limit)
        if slot is not None:
            if announced:
                log.info("%s: a VM slot is free, starting", who)
            return slot
        if not announced:
            log.info("%s: waiting for a VM slot: all %d in use (NIXOS_MAX_CONCURRENT_VMS=%d)",
                     who, limit, limit)
            announced = True
        if time.monotonic() > deadline:
            raise SandboxTimeout(
                f"no VM slot became free within {timeout:g} s (NIXOS_MAX_CONCURRENT_VMS={limit}); "
                f"shut down another VM kernel or raise the limit."
            )
        await asyncio.sleep(0.5)
