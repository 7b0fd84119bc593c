"""Directories of the server's own that no other local user can change.

The per-kernel state (sockets, keys, the control socket) and the VM slot locks live below a
directory that must be this user's alone, on a path no other user can rename or replace: a
directory pre-created by someone else in /tmp (or below a parent they can write) would let
them swap, read or block what the host puts there.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import SandboxUnavailable


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
    old = os.umask(0o077)
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise SandboxUnavailable(f"{what} {directory} cannot be created ({e.strerror or e}). {fix}") from e
    finally:
        os.umask(old)
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
