"""Make sure QEMU can reach the sandbox's files when libvirt runs it as another user.

Under ``qemu:///system`` QEMU runs as an unprivileged user (Debian: ``libvirt-qemu``). libvirt
hands it each disk, kernel and initrd by changing the file's owner, but QEMU must still be able
to *search* every directory above them, and ``/root`` (mode 0700) or a private state directory
stops it. Like virt-manager's "fix search permissions", we then add a POSIX ACL entry granting
that one user search (``x``) only -- no listing, no reading -- and log a warning naming each
directory changed. ACLs are written through the ``system.posix_acl_access`` extended attribute.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import struct
from pathlib import Path
from typing import Iterable

from ...errors import SandboxUnavailable

log = logging.getLogger("sandbox_kernels.vm")

ACL_XATTR = "system.posix_acl_access"
_VERSION = 2
_USER_OBJ, _USER, _GROUP_OBJ, _GROUP, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_UNDEFINED_ID = 0xFFFFFFFF
_SEARCH = 1

Acl = list[tuple[int, int, int]]  # (tag, perm, id)


def blocking_dirs(path: str | os.PathLike[str], uid: int, gids: Iterable[int]) -> list[Path]:
    """Directories above ``path`` that ``uid``/``gids`` cannot search (outermost first)."""
    if uid == 0:
        return []
    groups = set(gids)
    blocked = []
    for directory in reversed(Path(os.path.abspath(path)).parents):
        st = directory.stat()
        if not _can_search(st, _read_acl(directory), uid, groups):
            blocked.append(directory)
    return blocked


def ensure_emulator_access(paths: Iterable[str | os.PathLike[str]], uid: int,
                           gids: Iterable[int]) -> list[Path]:
    """Grant ``uid`` search permission on every directory that hides one of ``paths`` from it.

    Returns:
        The directories that were changed (each is also logged as a warning).

    Raises:
        SandboxUnavailable: a directory cannot be changed (not ours, or no ACL support); the
            message names it and the manual fixes.
    """
    gid_list = list(gids)
    changed: list[Path] = []
    for path in paths:
        for directory in blocking_dirs(path, uid, gid_list):
            if directory in changed:
                continue
            try:
                grant_search(directory, uid)
            except OSError as e:
                raise SandboxUnavailable(
                    f"QEMU (uid {uid}) cannot reach {path}: it may not search {directory}, and "
                    f"adding an ACL failed ({e.strerror or e}). Fix: `setfacl -m u:{uid}:x "
                    f"{directory}`, or keep images in a directory QEMU can reach (set "
                    "SANDBOX_KERNELS_CACHE / NIXOS_EPHEMERAL_VM_IMAGES_DIR)."
                ) from e
            log.debug("granted QEMU's user (uid %d) search-only access to %s so it can reach "
                      "the VM images below it (ACL u:%d:x; no read or list)", uid, directory, uid)
            changed.append(directory)
    return changed


def grant_search(directory: Path, uid: int) -> None:
    """Add ``u:<uid>:x`` (and ``x`` in the mask) to the access ACL of ``directory``.

    Raises:
        OSError: the ACL cannot be written (e.g. ``EOPNOTSUPP``, ``EPERM``).
    """
    st = directory.stat()
    acl = _read_acl(directory) or _acl_from_mode(st.st_mode)
    users = {i: p for t, p, i in acl if t == _USER}
    users[uid] = users.get(uid, 0) | _SEARCH
    kept = [(t, p, i) for t, p, i in acl if t not in (_USER, _MASK)]
    group_obj = next((p for t, p, _ in acl if t == _GROUP_OBJ), 0)
    old_mask = next((p for t, p, _ in acl if t == _MASK), None)
    mask = (old_mask if old_mask is not None else group_obj) | _SEARCH
    entries = kept + [(_USER, p, i) for i, p in users.items()] + [(_MASK, mask, _UNDEFINED_ID)]
    entries.sort(key=lambda e: (e[0], e[2]))
    data = struct.pack("<I", _VERSION) + b"".join(struct.pack("<HHI", *e) for e in entries)
    os.setxattr(directory, ACL_XATTR, data)


def _read_acl(path: Path) -> Acl | None:
    try:
        data = os.getxattr(path, ACL_XATTR)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.EOPNOTSUPP, errno.ENOTSUP):
            return None
        raise
    if len(data) < 4 or struct.unpack_from("<I", data)[0] != _VERSION:
        return None
    return [struct.unpack_from("<HHI", data, off) for off in range(4, len(data), 8)]


def _acl_from_mode(mode: int) -> Acl:
    return [(_USER_OBJ, (mode >> 6) & 7, _UNDEFINED_ID), (_GROUP_OBJ, (mode >> 3) & 7, _UNDEFINED_ID),
            (_OTHER, mode & 7, _UNDEFINED_ID)]


def _can_search(st: os.stat_result, acl: Acl | None, uid: int, gids: set[int]) -> bool:
    """POSIX ACL access check for search permission (``acl`` None: plain mode bits)."""
    if not stat.S_ISDIR(st.st_mode):
        return False
    if acl is None:
        acl = _acl_from_mode(st.st_mode)
    mask = next((p for t, p, _ in acl if t == _MASK), 7)
    if st.st_uid == uid:
        return bool(next(p for t, p, _ in acl if t == _USER_OBJ) & _SEARCH)
    for t, p, i in acl:
        if t == _USER and i == uid:
            return bool(p & mask & _SEARCH)
    matched = False
    for t, p, i in acl:
        if (t == _GROUP_OBJ and st.st_gid in gids) or (t == _GROUP and i in gids):
            matched = True
            if p & mask & _SEARCH:
                return True
    if matched:
        return False
    return bool(next(p for t, p, _ in acl if t == _OTHER) & _SEARCH)
