"""The directories a Docker kernel shares with its container, and how the host touches them.

Code in the kernel is hostile: whatever it can write it can swap for a symlink, a hard link,
a FIFO or a huge file. So the host never writes, reads or chowns by path inside a directory
the container can write. The layout under the kernel's state directory::

    <state_dir>/              host-private (0700), never mounted; holds control.sock
    <state_dir>/ipc/          the kernel's ipc sockets; the only read-write mount, at the same
                              path in the container. Replaced by a fresh, empty directory
                              before every kernel start; the old one goes with an fd-based
                              rmtree (which follows no symlink). With a root server it is a
                              tmpfs of its own (IPC_MOUNT_OPTIONS): 1 MiB, so a disk fill
                              through it stops there, and ``nosymfollow``, so a socket the
                              kernel swaps for a symlink cannot send the clients' connects
                              to another socket of the host.
    <state_dir>/conf/         the connection file, written atomically through a directory fd
                              (O_NOFOLLOW, O_EXCL); mounted read-only. The container reads it
                              through its group (root server) or as its owner (the server's
                              uid), and copies it into its own /tmp before the kernel starts
                              (ipykernel rewrites its connection file on start).

The only host operations inside ``ipc/`` are ``lstat`` of the socket paths, the clients' ZMQ
connects, and the removal of the whole directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

from ...private_dirs import write_all

IPC_DIR = "ipc"
CONF_DIR = "conf"
CONNECTION_FILE = "connection.json"
#: Where the container's copy of the connection file goes (its own filesystem, not shared).
CONTAINER_CONNECTION_FILE = "/tmp/sandbox-kernel-connection.json"
_MAX_CONNECTION_FILE = 64 * 1024
#: ``ipc/`` as its own tmpfs (root servers): sockets take no room, nothing else is needed.
IPC_MOUNT_OPTIONS = "size=1m,nr_inodes=4096,nosymfollow,nodev,nosuid,noexec,mode=0700"

#: Run by the container's python3 before the kernel: copy the read-only connection file into
#: the container's own /tmp (replacing whatever is there, following no symlink), then exec.
_COPY_AND_EXEC = (
    "import os,sys\n"
    "src,dst=sys.argv[1:3]\n"
    "data=open(src,'rb').read(%d)\n"
    "try:\n os.unlink(dst)\nexcept FileNotFoundError:\n pass\n"
    "fd=os.open(dst,os.O_WRONLY|os.O_CREAT|os.O_EXCL|os.O_NOFOLLOW,0o600)\n"
    "os.write(fd,data);os.close(fd)\n"
    "os.execvp(sys.argv[3],sys.argv[3:])\n"
) % _MAX_CONNECTION_FILE


class KernelDirs:
    """The shared directories of one Docker kernel.

    Args:
        state_dir: the kernel's private state directory (0700, owned by the server).
        sandbox_ids: ``(uid, gid)`` the container runs as when the server is root (the
            directories are handed to it through fds); None when the container runs as the
            server's own uid.
    """

    def __init__(self, state_dir: Path, sandbox_ids: tuple[int, int] | None) -> None:
        self.state_dir = state_dir
        self.sandbox_ids = sandbox_ids

    @property
    def ipc(self) -> Path:
        """The read-write directory of the kernel's ipc sockets."""
        return self.state_dir / IPC_DIR

    @property
    def conf(self) -> Path:
        """The read-only directory of the connection file."""
        return self.state_dir / CONF_DIR

    def volumes(self) -> dict[str, dict[str, str]]:
        """Docker bind mounts: ``ipc/`` read-write and ``conf/`` read-only, at the same paths."""
        return {str(self.ipc): {"bind": str(self.ipc), "mode": "rw"},
                str(self.conf): {"bind": str(self.conf), "mode": "ro"}}

    def container_command(self, cmd: list[str]) -> list[str]:
        """``cmd`` preceded by the copy of the connection file into the container's /tmp."""
        return ["python3", "-I", "-S", "-c", _COPY_AND_EXEC,
                str(self.conf / CONNECTION_FILE), CONTAINER_CONNECTION_FILE, *cmd]

    def prepare(self, connection_info: dict[str, Any]) -> None:
        """Before a kernel start: a fresh ``ipc/`` and the connection file in ``conf/``.

        No kernel runs now (first start, or its container was stopped or removed), and a
        stopped container's mount still refers to the old ``ipc/``, so nothing of the
        sandbox can reach the new directory before the container starts again.
        """
        self._fresh_ipc()
        self._write_connection_file(json.dumps(connection_info).encode())

    def sockets_bound(self, prefix: str, ports: list[int]) -> bool:
        """Whether the kernel has bound all its sockets (``lstat``: a symlink does not count)."""
        for port in ports:
            try:
                if not stat.S_ISSOCK(os.lstat(f"{prefix}-{port}").st_mode):
                    return False
            except FileNotFoundError:
                return False
        return True

    # -- the host's side ---------------------------------------------------------------------

    def _fresh_ipc(self) -> None:
        if os.path.lexists(self.ipc):
            unmount(self.ipc)
            old = self.state_dir / f"{IPC_DIR}.old-{secrets.token_hex(4)}"
            os.rename(self.ipc, old)  # within the host-private state directory
            remove_tree(old)
        os.mkdir(self.ipc, 0o700)
        if self.sandbox_ids is not None:  # root: a small tmpfs where symlinks are not followed
            uid, gid = self.sandbox_ids
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"{IPC_MOUNT_OPTIONS},uid={uid},gid={gid}",
                            "sandbox-kernels-ipc", str(self.ipc)], check=True, capture_output=True,
                           timeout=30)
        fd = os.open(self.ipc, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            if self.sandbox_ids is not None:
                os.fchown(fd, *self.sandbox_ids)
            os.fchmod(fd, 0o700)
        finally:
            os.close(fd)

    def _write_connection_file(self, data: bytes) -> None:
        with contextlib.suppress(FileExistsError):
            os.mkdir(self.conf, 0o700)
        dfd = os.open(self.conf, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            readable = 0o700
            if self.sandbox_ids is not None:  # readable by the container's group, no more
                os.fchown(dfd, -1, self.sandbox_ids[1])
                readable = 0o750
            os.fchmod(dfd, readable)
            tmp = f".{CONNECTION_FILE}.{secrets.token_hex(4)}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dfd)
            try:
                if self.sandbox_ids is not None:
                    os.fchown(fd, -1, self.sandbox_ids[1])
                    os.fchmod(fd, 0o640)
                write_all(fd, data)
            finally:
                os.close(fd)
            os.replace(tmp, CONNECTION_FILE, src_dir_fd=dfd, dst_dir_fd=dfd)
        finally:
            os.close(dfd)


def unmount(path: Path) -> None:
    """Unmount ``path`` if something is mounted there (our ``ipc/`` tmpfs)."""
    if os.path.ismount(path):
        subprocess.run(["umount", "--lazy", str(path)], check=True, capture_output=True, timeout=30)


def mounts_below(path: Path) -> list[str]:
    """Mount points at or below ``path`` (from /proc/self/mountinfo), deepest first."""
    top = os.path.realpath(path)
    found = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                point = line.split()[4].replace("\\040", " ")
                if point == top or point.startswith(top.rstrip("/") + "/"):
                    found.append(point)
    except OSError:
        return []
    return sorted(found, key=len, reverse=True)


def remove_state_dir(path: Path) -> None:
    """Remove a kernel's state directory that a dead process left: its ``ipc/`` tmpfs too."""
    for point in mounts_below(path):
        subprocess.run(["umount", "--lazy", point], capture_output=True, timeout=30)
    shutil.rmtree(path, ignore_errors=True)


def release_ipc(path: Path) -> None:
    """Remove an ``ipc/`` directory: unmount its tmpfs, then remove what is left."""
    if os.path.lexists(path):
        unmount(path)
        remove_tree(path)


def remove_tree(path: Path) -> None:
    """Remove a directory the sandbox could write, following no symlink it planted.

    ``shutil.rmtree`` works through directory fds with ``O_NOFOLLOW`` on Linux. A directory
    the sandbox locked (mode 0 or 0500) against its owner, the server's uid, is opened
    ``O_PATH | O_NOFOLLOW`` and opened up through ``/proc/self/fd``, then removed on the next
    pass. Called only while no process of the sandbox runs; what cannot be removed stays.
    """

    def unlock(func: Any, failed: str, exc: Any) -> None:
        for directory in (failed, os.path.dirname(failed)):
            try:
                fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                os.chmod(f"/proc/self/fd/{fd}", 0o700)
            except OSError:
                pass
            finally:
                os.close(fd)

    for _ in range(8):  # each pass unlocks one more level of what the sandbox locked
        shutil.rmtree(path, onerror=unlock)
        if not os.path.lexists(path):
            return
