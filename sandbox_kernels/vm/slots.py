"""``NIXOS_MAX_CONCURRENT_VMS`` as a queue: VM slots are lock files shared by all processes of a user.

A kernel holds one slot (an exclusive ``flock`` on ``slot-<n>.lock``) for its VM's lifetime;
the kernel that finds every slot taken waits and says so in the log. Locks vanish with their
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

from ..cache import cache_dir
from ..errors import SandboxTimeout, SandboxUnavailable


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

    def release(self) -> None:
        """Free the slot."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def open_private_dir(directory: Path) -> int:
    """Create ``directory`` (0700) if needed and open it, refusing one that is not ours alone.

    Returns:
        A file descriptor of the directory (the caller closes it).

    Raises:
        SandboxUnavailable: it is a symlink or not a directory, belongs to another user, or
            others may write to it; the message names it and the fix.
    """
    try:
        directory.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise SandboxUnavailable(
            f"the VM slot directory {directory} cannot be used ({e.strerror or e}): it must be a "
            "directory of this user, not a link; remove it.") from e
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or st.st_mode & 0o022 or not stat.S_ISDIR(st.st_mode):
        os.close(fd)
        raise SandboxUnavailable(
            f"the VM slot directory {directory} belongs to uid {st.st_uid} with mode "
            f"{stat.S_IMODE(st.st_mode):o}: it must be this user's (uid {os.geteuid()}) and closed "
            "to others. Remove it, or set XDG_RUNTIME_DIR to a private directory.")
    return fd


def try_acquire_slot(directory: Path, limit: int) -> VMSlot | None:
    """Take one of ``limit`` slots in ``directory`` if one is free, without waiting.

    Raises:
        SandboxUnavailable: the directory or a lock file in it is not ours alone (see
            :func:`open_private_dir`).
    """
    dir_fd = open_private_dir(directory)
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
                       who: str) -> VMSlot:
    """Take one of ``limit`` slots, waiting in line (asynchronously) up to ``timeout`` seconds.

    Raises:
        SandboxTimeout: no slot became free in time.
        SandboxUnavailable: the slot directory is not ours alone.
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
