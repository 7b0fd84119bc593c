"""The host-side sockets a forwarded kernel's clients connect to: unix sockets by default.

Runtimes whose kernel is reached through a forward (VM, SSH host, Kubernetes) listen on the
host for the five ZMQ channels. Over TCP, even on 127.0.0.1, every local user can connect
and subscribe to iopub (the connection key signs messages; it does not encrypt them). With
``transport="ipc"`` (the default) the listeners are unix sockets in the kernel's own state
directory (mode 0700, so only its owner can reach them), each created 0600. jupyter_client
names ipc endpoints ``<ip>-<port>``: ``ip`` is a path prefix in the state directory and the
"ports" are small suffixes, unique per kernel because the directory is.

jupyter_client removes those names on every restart (``cleanup_ipc_files``) while the
provisioner keeps its listeners, so clients stay connected: each socket is bound under a
private name first and hard-linked to the public one, which :meth:`ClientSockets.relink`
restores. Nothing here follows a path another user could plant: the directory is opened
without following a link and must be owned by this user with no access for others, every name
is then used relative to that descriptor, and stale names are unlinked (never opened) before
binding.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import Any

from traitlets import Enum

from .errors import SandboxConfigError, SandboxConnectionError

CHANNELS = ("shell", "iopub", "stdin", "control", "hb")
TRANSPORTS = ("ipc", "tcp")
_IPC_PREFIX = "k"
_PRIVATE_PREFIX = "listen-"
_MAX_UNIX_PATH = 107  # sun_path holds 108 bytes with the terminating NUL


def transport_trait() -> Enum:
    """The ``transport`` setting of the forwarding runtimes (tag: ipc is narrower than tcp)."""
    return Enum(
        list(TRANSPORTS), "ipc", config=True,
        help="How clients on this host reach the kernel: 'ipc' (unix sockets in the kernel's "
        "0700 state directory, reachable by this user only) or 'tcp' (127.0.0.1 ports, which "
        "every local user can connect to; for clients that cannot use ipc). "
        "Env: SANDBOX_KERNELS_TRANSPORT.",
    ).tag(widen=TRANSPORTS)


def listen_local(port: int) -> socket.socket:
    """A non-blocking socket listening on 127.0.0.1 only.

    Raises:
        SandboxConnectionError: the port cannot be bound.
    """
    def bind(sock: socket.socket) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))

    return _listening(socket.AF_INET, bind, f"127.0.0.1:{port}")


@contextlib.contextmanager
def private_dir(directory: Path) -> Iterator[int]:
    """A descriptor of ``directory``, opened without following a link and checked to be this
    user's with no access for others; names inside are then used relative to it, so the
    directory cannot be swapped between the check and the use.

    Raises:
        SandboxConfigError: a symlink, not a directory, not owned by this user, or open to
            group or others.
    """
    fix = ("Remove it, or set state_root (SANDBOX_KERNELS_STATE_DIR) to a private directory.")
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise SandboxConfigError(f"state directory {directory} must be a directory owned by uid "
                                 f"{os.geteuid()} with mode 0700, not a link ({e.strerror}). {fix}") from e
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise SandboxConfigError(
                f"state directory {directory} must be a directory owned by uid {os.geteuid()} with "
                f"mode 0700 (it is uid {st.st_uid}, mode {stat.filemode(st.st_mode)}): ipc sockets "
                f"there would be reachable by others. {fix}")
        yield fd
    finally:
        os.close(fd)


def listen_unix(path: Path) -> socket.socket:
    """A non-blocking unix socket listening at ``path``, created with mode 0600.

    The directory must be private (see :func:`private_dir`); an existing name at ``path`` is
    unlinked first.

    Raises:
        SandboxConfigError: the path is too long for a unix socket, or the directory is not
            private.
        SandboxConnectionError: it cannot be bound.
    """
    _check_length(path)
    with private_dir(path.parent) as fd:
        return _listen_at(fd, path.name)


def _check_length(path: Path) -> None:
    if len(os.fsencode(path)) > _MAX_UNIX_PATH:
        raise SandboxConfigError(
            f"ipc socket path {path} is longer than {_MAX_UNIX_PATH} bytes: set state_root "
            "(SANDBOX_KERNELS_STATE_DIR) to a shorter directory, or transport='tcp'.")


def _listen_at(dir_fd: int, name: str) -> socket.socket:
    """Bind ``name`` in the directory ``dir_fd`` (through /proc/self/fd: bind takes no
    directory descriptor). The mode is set on the socket before ``bind`` (Linux creates the
    file with it), so the file is never open to others, and no process-wide umask is touched.

    Raises:
        SandboxConnectionError: it cannot be bound.
    """
    def bind(sock: socket.socket) -> None:
        os.fchmod(sock.fileno(), 0o600)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dir_fd)
        sock.bind(f"/proc/self/fd/{dir_fd}/{name}")

    return _listening(socket.AF_UNIX, bind, f"unix socket {name}")


def _listening(family: socket.AddressFamily, bind: Callable[[socket.socket], None],
               where: str) -> socket.socket:
    """A new stream socket of ``family``, bound by ``bind``, listening and non-blocking; on a
    failure it is closed.

    Raises:
        SandboxConnectionError: it cannot be bound (the message names ``where``).
    """
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        bind(sock)
        sock.listen(128)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise SandboxConnectionError(f"cannot listen on {where}: {e}") from e
    return sock


class ClientSockets:
    """The five listeners of one kernel, from the connection file until the kernel is gone.

    :meth:`assign` picks the endpoints and binds them at once (binding late, after a VM boot,
    races with the rest of the machine); a forwarder takes each over with :meth:`claim` and
    owns it from then on.

    Args:
        transport: ``"ipc"`` or ``"tcp"``.
        state_dir: the kernel's private state directory (ipc only).
    """

    def __init__(self, transport: str, state_dir: Path):
        if transport not in TRANSPORTS:
            raise SandboxConfigError(f"transport={transport!r} must be one of {TRANSPORTS}.")
        self.transport = transport
        self.state_dir = state_dir
        self._reserved: dict[int, socket.socket] = {}

    @property
    def ip(self) -> str:
        """The connection file's ``ip``: 127.0.0.1, or the ipc path prefix."""
        return str(self.state_dir / _IPC_PREFIX) if self.transport == "ipc" else "127.0.0.1"

    def public_path(self, port: int) -> Path:
        """Where clients connect for ``port`` (ipc)."""
        return Path(f"{self.ip}-{port}")

    def _public_name(self, port: int) -> str:
        return f"{_IPC_PREFIX}-{port}"

    @staticmethod
    def _private_name(port: int) -> str:
        return f"{_PRIVATE_PREFIX}{port}"

    def assign(self, km: Any, ports: dict[str, int]) -> None:
        """Set ``km``'s transport, ip and (unless ``ports`` holds them already) ports.

        Args:
            km: the kernel manager, before its connection file is written.
            ports: the ports kept from an earlier start (``{"shell_port": n, ...}``), or empty.

        Raises:
            SandboxConfigError: the state directory is not private, or a path is too long.
            SandboxConnectionError: a listener cannot be bound.
        """
        km.transport = self.transport
        km.ip = self.ip
        if ports:
            self.relink()
            return
        for n, ch in enumerate(CHANNELS, start=1):
            sock = self._bind(n) if self.transport == "ipc" else listen_local(0)
            port = n if self.transport == "ipc" else int(sock.getsockname()[1])
            self._reserved[port] = sock
            setattr(km, f"{ch}_port", port)

    def _bind(self, port: int) -> socket.socket:
        _check_length(self.public_path(port))
        with private_dir(self.state_dir) as fd:
            sock = _listen_at(fd, self._private_name(port))
            try:
                self._link(fd, port)
            except BaseException:
                sock.close()
                raise
            return sock

    def _link(self, fd: int, port: int) -> None:
        public, private = self._public_name(port), self._private_name(port)
        with contextlib.suppress(FileNotFoundError):
            if os.stat(public, dir_fd=fd, follow_symlinks=False).st_ino == \
                    os.stat(private, dir_fd=fd, follow_symlinks=False).st_ino:
                return
            os.unlink(public, dir_fd=fd)
        try:
            os.link(private, public, src_dir_fd=fd, dst_dir_fd=fd, follow_symlinks=False)
        except OSError as e:
            raise SandboxConnectionError(f"cannot link ipc socket {self.public_path(port)}: {e}") from e

    def claim(self, port: int) -> socket.socket:
        """The listener for ``port``: the one bound by :meth:`assign`, or a new one (after the
        forwards were closed). The caller owns it from now on.

        Raises:
            SandboxConfigError, SandboxConnectionError: as for :meth:`assign`.
        """
        sock = self._reserved.pop(port, None)
        if sock is not None:
            return sock
        return self._bind(port) if self.transport == "ipc" else listen_local(port)

    def relink(self) -> None:
        """Give back the public ipc names jupyter_client removed on a restart (the listeners,
        bound under their private names, never went away).

        Raises:
            SandboxConfigError: the state directory is no longer private.
        """
        if self.transport != "ipc":
            return
        with private_dir(self.state_dir) as fd:
            for port in range(1, len(CHANNELS) + 1):
                with contextlib.suppress(FileNotFoundError):
                    os.stat(self._private_name(port), dir_fd=fd, follow_symlinks=False)
                    self._link(fd, port)

    def release(self) -> None:
        """Close the listeners nobody claimed and remove every ipc name (claimed sockets are
        closed by their forwarder)."""
        for sock in self._reserved.values():
            sock.close()
        self._reserved.clear()
        if self.transport != "ipc" or not os.path.isdir(self.state_dir):
            return
        with contextlib.suppress(SandboxConfigError), private_dir(self.state_dir) as fd:
            for port in range(1, len(CHANNELS) + 1):
                for name in (self._public_name(port), self._private_name(port)):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(name, dir_fd=fd)
