"""The line of kernels waiting for a VM slot, visible to every process of the user.

Each waiter holds an exclusive ``flock`` on a file of its own in the private slot directory,
``waiter-<time ns>-<pid>-<random>.lock``: the names sort oldest first, and a waiter's place is
one plus the number of older waiters still alive. The file is locked before it gets its name
(made under a temporary name, locked, then renamed), so a visible waiter file whose lock is
free belongs to a process that died: whoever finds it removes it. Only the head of the line
takes a slot, so kernels get slots in the order they asked.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import stat
import time
from pathlib import Path

from ...errors import SandboxUnavailable
from ...private_dirs import open_private_dir

PREFIX = "waiter-"
_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def _open_dir(directory: Path) -> int:
    return open_private_dir(directory, "the VM slot directory",
                            "Set XDG_RUNTIME_DIR to a private directory.")


def _alive(dir_fd: int, name: str) -> bool:
    """Whether the waiter ``name`` still holds its lock; a dead one's file is removed."""
    try:
        fd = os.open(name, _FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        return False  # it left the line meanwhile
    except OSError:
        return True  # not ours to judge (a link, say): count it, never follow it
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dir_fd)
        return False
    finally:
        os.close(fd)


def waiters(directory: Path) -> list[str]:
    """The live waiters' file names, oldest first (dead ones' files are removed)."""
    dir_fd = _open_dir(directory)
    try:
        names = sorted(n for n in os.listdir(dir_fd) if n.startswith(PREFIX) and n.endswith(".lock"))
        return [n for n in names if _alive(dir_fd, n)]
    finally:
        os.close(dir_fd)


class QueuePlace:
    """One waiter's place in line; :meth:`leave` (idempotent) gives it up.

    Raises:
        SandboxUnavailable: the slot directory is not ours alone.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.name = f"{PREFIX}{time.time_ns():020d}-{os.getpid()}-{secrets.token_hex(4)}.lock"
        dir_fd = _open_dir(directory)
        try:
            temporary = f".new-{self.name}"
            try:
                fd = os.open(temporary, _FLAGS | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=dir_fd)
            except OSError as e:
                raise SandboxUnavailable(
                    f"cannot join the VM queue in {directory} ({e.strerror or e})") from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else holds it
                os.rename(temporary, self.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except BaseException:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(temporary, dir_fd=dir_fd)
                raise
        finally:
            os.close(dir_fd)
        self._fd: int | None = fd

    def position(self) -> int:
        """1-based place in line (1: next to get a slot)."""
        return 1 + sum(1 for name in waiters(self.directory) if name < self.name)

    def leave(self) -> None:
        """Leave the line (got a slot, gave up, or was cancelled)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            dir_fd = _open_dir(self.directory)
            try:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.name, dir_fd=dir_fd)
            finally:
                os.close(dir_fd)
        finally:
            os.close(fd)  # after the unlink: a visible waiter file is always a locked one
