"""``NIXOS_MAX_CONCURRENT_VMS`` as a queue: VM slots are lock files shared by all processes of a user.

A kernel holds one slot (an exclusive ``flock`` on ``slot-<n>.lock``) for its VM's lifetime;
the kernel that finds every slot taken waits in line (:mod:`.slot_queue`: first come, first
served, across processes) and reports its place. Locks vanish with their
process, so a crashed server never leaks a slot.

The lock files live in a directory of the user's own (:func:`slots_dir`), never in a shared
one: another local user must not be able to take the slots, block them, or plant links there.
The directory must belong to us and be closed to others, and the lock files are opened
relative to it without following links.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import stat
import time
from pathlib import Path
from typing import Callable

from ...aio import to_thread
from ...cache import cache_dir
from ...errors import SandboxTimeout, SandboxUnavailable
from ...private_dirs import open_private_dir
from . import slot_queue


def slots_dir() -> Path:
    """``$XDG_RUNTIME_DIR/sandbox-kernels-vm-slots`` when that is set, else ``cache_dir()/vm-slots``
    (both the user's own, never ``/tmp``)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return Path(runtime) / "sandbox-kernels-vm-slots"
    return cache_dir() / "vm-slots"


class VMSlot:
    """One held slot; :meth:`release` (idempotent) frees it."""

    def __init__(self, fd: int, path: Path) -> None:
        self._fd: int | None = fd
        self.path = path

    def hand_over(self) -> int:
        """Give the held lock's descriptor away (to pass to a process that claims the VM):
        the slot stays held through it, this object holds nothing after."""
        if self._fd is None:
            raise ValueError("the slot is not held")
        fd, self._fd = self._fd, None
        return fd

    def release(self) -> None:
        """Free the slot."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def try_acquire_slot(directory: Path, limit: int) -> VMSlot | None:
    """Take one of ``limit`` slots in ``directory`` if one is free, without waiting.

    Raises:
        SandboxUnavailable: the directory or a lock file in it is not ours alone (see
            :func:`open_private_dir`).
    """
    dir_fd = open_private_dir(directory, "the VM slot directory",
                              "Set XDG_RUNTIME_DIR to a private directory.")
    try:
        for n in range(limit):
            name = f"slot-{n}.lock"
            try:
                fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                             0o600, dir_fd=dir_fd)
            except OSError as e:
                raise SandboxUnavailable(
                    f"VM slot lock {directory / name} cannot be opened ({e.strerror or e}); "
                    "remove it.") from e
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise SandboxUnavailable(f"VM slot lock {directory / name} is not a regular file; remove it.")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            return VMSlot(fd, directory / name)
        return None
    finally:
        os.close(dir_fd)


async def acquire_slot(directory: Path, limit: int, timeout: float, log: logging.Logger,
                       who: str, on_queued: Callable[[int], None] | None = None) -> VMSlot:
    """Take one of ``limit`` slots, waiting in line (asynchronously) up to ``timeout`` seconds.

    Kernels get slots in the order they asked, across processes (see :mod:`.slot_queue`).
    ``on_queued(position)`` is called when the kernel starts waiting and whenever its 1-based
    place in line changes.

    Raises:
        SandboxTimeout: no slot became free in time.
        SandboxUnavailable: the slot directory is not ours alone.
    """
    if not await to_thread(slot_queue.waiters, directory):
        slot = await to_thread(try_acquire_slot, directory, limit)
        if slot is not None:
            return slot
    deadline = time.monotonic() + timeout
    place = await to_thread(slot_queue.QueuePlace, directory)
    try:
        reported = 0
        while True:
            position = await to_thread(place.position)
            if position == 1:
                slot = await to_thread(try_acquire_slot, directory, limit)
                if slot is not None:
                    if reported:
                        log.info("%s: a VM slot is free, starting", who)
                    return slot
            if position != reported:
                if not reported:
                    log.info("%s: waiting for a VM slot: all %d in use (NIXOS_MAX_CONCURRENT_VMS=%d)",
                             who, limit, limit)
                log.info("%s: place %d in the VM queue", who, position)
                reported = position
                if on_queued is not None:
                    on_queued(position)
            if time.monotonic() > deadline:
                raise SandboxTimeout(
                    f"no VM slot became free within {timeout:g} s (NIXOS_MAX_CONCURRENT_VMS={limit}); "
                    f"shut down another VM kernel or raise the limit."
                )
            await asyncio.sleep(0.5)
    finally:
        place.leave()
