"""A kernel directory on a shared host that no other user of that host can touch.

The SSH host runtime keeps a kernel's connection file (its HMAC key), log and exit status in a
directory on the remote. On a host with other users, a directory under a path they can write
is theirs to swap: they pre-create a parent, plant ``connection.json`` (the kernel then uses
their key) or turn ``kernel.log`` into a symlink. So the directory is made by
``tempfile.mkdtemp`` (a fresh 0700 name nobody can predict) in a base directory whose every
component, from ``/`` down, only root or the login user can change:

* each component is owned by root or the login user and is not writable by group or others,
* except a root-owned sticky directory (``/tmp``): then the next component must be the login
  user's own directory of mode 0700 (the sticky bit stops others renaming it).

The base is ``~/.cache/sandbox-kernels-ssh`` (made 0700 if missing; not the image cache
``~/.cache/sandbox-kernels`` of a host that also runs the server) unless an admin sets
``remote_root``. The check runs on the remote, with its Python, in one round trip; its verdict
comes back as one bounded JSON line.
"""

from __future__ import annotations

import json
from typing import Protocol

from ...errors import SandboxConfigError, SandboxStartError
from ...ssh.runner import CommandResult

#: The default base, relative to the login user's home directory.
DEFAULT_BASE = "~/.cache/sandbox-kernels-ssh"
_MAX_REPLY = 16384

# argv: base ('~/...' or absolute), name prefix. Prints one JSON line: {"dir": path} or
# {"refused": reason} (exit 3). Written for any Python 3 the remote may have.
_SCRIPT = r"""
import json, os, stat, sys, tempfile

uid = os.geteuid()


def answer(key, value, code=0):
    sys.stdout.write(json.dumps({key: value}) + "\n")
    sys.exit(code)


def refuse(reason):
    answer("refused", reason, 3)


def check(path):
    # Every component of the physical path, from /: returns whether the last one is a
    # root-owned sticky directory (then what goes in it must be our own 0700 directory).
    sticky = False
    current = "/"
    for name in [""] + [p for p in path.split("/") if p]:
        current = os.path.join(current, name) if name else "/"
        st = os.lstat(current)
        mode = stat.S_IMODE(st.st_mode)
        if not stat.S_ISDIR(st.st_mode):
            refuse("%s is not a directory (or was replaced while it was checked)" % current)
        if sticky and (st.st_uid != uid or mode & 0o077):
            refuse("%s is in a directory every user can write, so it must be your own directory "
                   "of mode 0700; it is owned by uid %d with mode %o" % (current, st.st_uid, mode))
        if st.st_uid not in (0, uid):
            refuse("%s is owned by uid %d, not by root or you (uid %d)" % (current, st.st_uid, uid))
        sticky = bool(mode & 0o022) and st.st_uid == 0 and bool(mode & stat.S_ISVTX)
        if mode & 0o022 and not sticky:
            refuse("%s can be written by other users (mode %o)" % (current, mode))
    return sticky


def main(base, prefix):
    os.umask(0o077)
    if base == "~" or base.startswith("~/"):
        home = os.path.realpath(os.path.expanduser("~"))
        check(home)
        base = os.path.join(home, base[2:])
    elif not base.startswith("/"):
        refuse("%s is neither absolute nor under ~/" % base)
    if not os.path.isdir(base):
        existing = os.path.dirname(base.rstrip("/"))
        while not os.path.isdir(existing):
            existing = os.path.dirname(existing)
        check(os.path.realpath(existing))
        try:
            os.makedirs(base, 0o700)
        except OSError as e:
            refuse("%s cannot be created: %s" % (base, e.strerror))
    base = os.path.realpath(base)
    check(base)
    made = tempfile.mkdtemp(prefix=prefix + ".", dir=base)
    st = os.lstat(made)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or stat.S_IMODE(st.st_mode) != 0o700:
        refuse("%s was not created as your own 0700 directory" % made)
    answer("dir", made)


try:
    main(sys.argv[1], sys.argv[2])
except OSError as e:
    refuse("%s: %s" % (getattr(e, "filename", "") or "the kernel directory", e.strerror or e))
"""


class _Runner(Protocol):
    def run(self, argv: list[str], input: bytes | None = None, timeout: float = 60.0,
            max_output: int = ...) -> CommandResult: ...


def make_private_dir(runner: _Runner, python: str, base: str, prefix: str, setting: str,
                     timeout: float = 30.0) -> str:
    """Create a fresh private directory under ``base`` on the remote and return its path.

    Args:
        runner: runs a command on the remote (an :class:`SSHTunnel`).
        python: the remote Python that runs the check.
        base: the base directory, absolute or under ``~/``.
        prefix: the start of the new directory's name (the kernel id).
        setting: how the base was chosen, for messages (``"remote_root='/scratch'"``).
        timeout: seconds for the round trip.

    Returns:
        The new directory's absolute, physical path.

    Raises:
        SandboxConfigError: a component of ``base`` can be changed by another user, or ``base``
            cannot be made; the message names ``setting``.
        SandboxStartError: the remote Python failed or gave no usable answer.
        SandboxTimeout, SandboxConnectionError: as for ``run``.
    """
    result = runner.run([python, "-I", "-c", _SCRIPT, base, prefix], None, timeout, _MAX_REPLY)
    try:
        reply = json.loads(result.stdout.decode(errors="replace").strip() or "{}")
    except ValueError:
        reply = {}
    if not isinstance(reply, dict):
        reply = {}
    if result.exit_code == 3 and isinstance(reply.get("refused"), str):
        raise SandboxConfigError(
            f"{setting}: refusing to keep kernel files there: {reply['refused'][:500]}. Other users "
            "of the host could swap the kernel's files. Use a directory only you and root can "
            "change (an admin sets remote_root in the Jupyter config; unset, it is "
            f"{DEFAULT_BASE}).")
    path = reply.get("dir")
    if result.exit_code != 0 or not _usable(path):
        detail = result.stderr.decode(errors="replace").strip()[-500:]
        raise SandboxStartError(
            f"could not make the kernel directory under {base} with {python} on the host "
            f"(exit {result.exit_code}): {detail or 'no answer'}")
    return str(path)


def _usable(path: object) -> bool:
    """An absolute path the shell scripts can take as one argument."""
    return (isinstance(path, str) and path.startswith("/") and len(path) < 4096
            and not any(c in path for c in "\0\n"))

