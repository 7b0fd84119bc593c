"""QEMU processes of libvirt domains: which user QEMU runs as, and which process is a domain's.

Read from ``/etc/libvirt/qemu.conf``, the user database and ``/proc``; no libvirt call.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
from pathlib import Path

_QEMU_CONF = Path("/etc/libvirt/qemu.conf")


def emulator_identity(uri: str) -> tuple[int, list[int]]:
    """The uid and gids QEMU runs as on connection ``uri`` (to check it can read the files).

    ``qemu:///session`` runs QEMU as the caller; ``qemu:///system`` as the ``user`` and
    ``group`` of ``/etc/libvirt/qemu.conf`` (Debian's default ``libvirt-qemu``).
    """
    if "session" in uri:
        return os.getuid(), os.getgroups() + [os.getgid()]
    user, group = _qemu_conf_identity()
    try:
        entry = pwd.getpwnam(user) if not user.startswith("+") else pwd.getpwuid(int(user[1:]))
    except (KeyError, ValueError):
        return 0, [0]
    gid = entry.pw_gid
    # libvirt's built-in default group is the user's name (Debian: libvirt-qemu).
    with contextlib.suppress(KeyError, ValueError):
        gid = int(group[1:]) if group.startswith("+") else grp.getgrnam(group or user).gr_gid
    gids = {gid, entry.pw_gid} | {g.gr_gid for g in grp.getgrall() if entry.pw_name in g.gr_mem}
    return entry.pw_uid, sorted(gids)


def qemu_pid(name: str) -> int | None:
    """The PID of domain ``name``'s QEMU process (from libvirt's pid file, else ``/proc``)."""
    pidfile = Path("/run/libvirt/qemu") / f"{name}.pid"
    with contextlib.suppress(OSError, ValueError):
        pid = int(pidfile.read_text().strip())
        if _is_qemu_of(pid, name):
            return pid
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _is_qemu_of(int(entry.name), name):
            return int(entry.name)
    return None


def _is_qemu_of(pid: int, name: str) -> bool:
    """Whether process ``pid`` is the QEMU of domain ``name`` (``-name guest=<name>,...``)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    wanted = f"guest={name}".encode()
    return b"qemu" in argv[0] and any(a == wanted or a.startswith(wanted + b",") for a in argv)


def _qemu_conf_identity() -> tuple[str, str]:
    """``(user, group)`` from qemu.conf, defaulting to Debian's ``libvirt-qemu``."""
    user, group = "", ""
    with contextlib.suppress(OSError):
        for line in _QEMU_CONF.read_text().splitlines():
            match = re.match(r'^\s*(user|group)\s*=\s*"([^"]*)"', line)
            if match:
                if match.group(1) == "user":
                    user = match.group(2)
                else:
                    group = match.group(2)
    if not user:
        for candidate in ("libvirt-qemu", "qemu"):
            with contextlib.suppress(KeyError):
                pwd.getpwnam(candidate)
                user = candidate
                break
    return user or "root", group
