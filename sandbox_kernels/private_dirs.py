"""Directories and files of the server's own that no other local user can change or read.

The per-kernel state (sockets, keys, the control socket) and the VM slot locks live below a
directory that must be this user's alone, on a path no other user can rename or replace: a
directory pre-created by someone else in /tmp (or below a parent they can write) would let
them swap, read or block what the host puts there. Private files (SSH keys, a VM's seed disk)
are created 0600 from the start and never written through a symbolic link.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import SandboxConfigError, SandboxUnavailable


def open_private_dir(directory: Path, what: str, fix: str) -> int:
    """Create ``directory`` (0700, parents too) if needed and open it, refusing one others could
    change: a link, another user's, open to others, or below a parent another user may write
    (a parent writable by others is fine only when it is root's and sticky, like /tmp).

    Args:
        directory: the directory.
        what: what it is, for messages ("the VM slot directory").
        fix: how to choose another one, for messages.

    Returns:
        A file descriptor of the directory (the caller closes it).

    Raises:
        SandboxUnavailable: the message names the directory, what is wrong, and ``fix``.
    """
    try:
        _make_dirs(directory)
    except OSError as e:
        raise SandboxUnavailable(f"{what} {directory} cannot be created ({e.strerror or e}). {fix}") from e
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise SandboxUnavailable(
            f"{what} {directory} cannot be used ({e.strerror or e}): it must be a directory of "
            f"this user, not a link; remove it. {fix}") from e
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or st.st_mode & 0o022 or not stat.S_ISDIR(st.st_mode):
        os.close(fd)
        raise SandboxUnavailable(
            f"{what} {directory} belongs to uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):o}: "
            f"it must be this user's (uid {os.geteuid()}) and closed to others. Remove it. {fix}")
    if st.st_mode & 0o077:
        os.fchmod(fd, 0o700)
    for parent in Path(os.path.realpath(directory)).parents:
        pst = os.stat(parent)
        shared = pst.st_mode & 0o022 and not (pst.st_mode & stat.S_ISVTX and pst.st_uid == 0)
        if pst.st_uid not in (0, os.geteuid()) or shared:
            os.close(fd)
            raise SandboxUnavailable(
                f"{what} {directory} is below {parent} (uid {pst.st_uid}, mode "
                f"{stat.S_IMODE(pst.st_mode):o}), which another user can change. {fix}")
    return fd


def _make_dirs(directory: Path) -> None:
    """Create ``directory`` and its missing parents, each with mode 0700 at most.

    The process umask is left alone: it is process-wide, so changing and restoring it from one
    thread races with another thread doing the same and can leave it changed for good.
    """
    missing = [p for p in (directory, *directory.parents) if not p.exists()]
    for path in reversed(missing):
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass


def write_private_file(path: str | os.PathLike[str], data: bytes, what: str) -> Path:
    """Write ``data`` to ``path``, created with mode 0600 and never readable by others.

    An existing file is truncated and reset to 0600 before any byte is written. Symbolic links
    are refused.

    Args:
        path: the file to write.
        data: its new content.
        what: what it is, for messages ("key file").

    Returns:
        The path.

    Raises:
        SandboxConfigError: the file cannot be written (the message names it).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as e:
        raise SandboxConfigError(f"cannot write {what} {os.fspath(path)}: {e}") from e
    try:
        os.fchmod(fd, 0o600)
        write_all(fd, data)
    finally:
        os.close(fd)
    return Path(path)


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to the open file ``fd`` (one ``os.write`` may write less)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
