"""One SSH connection per sandbox: pinned host key, port forwards, reconnects, remote commands.

:class:`SSHTunnel` holds a single in-process paramiko ``Transport``. Each forwarded port is a
socket listening on 127.0.0.1; every connection accepted there becomes a ``direct-tcpip``
channel, and one selector thread per tunnel (named ``sandbox-ssh-<host>:<port>``) pumps all of
them. When the connection drops, that thread reconnects with the same key and the same pinned
host key (bounded retries with backoff) while the local ports stay open, so ZMQ clients simply
reconnect. Remote commands (:meth:`SSHTunnel.run`, :meth:`SSHTunnel.start_detached`, ...) use
the same transport. A forward may listen on a unix socket instead (given by the caller), so
that only its owner can connect.

The API blocks and is thread-safe; async callers wrap calls in ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from types import TracebackType

import paramiko

from ..errors import SandboxConfigError, SandboxConnectionError, SandboxError, SandboxTimeout
from .connect import (
    Connector,
    check_port,
    check_tunnel_args,
    close_transport,
    describe_error,
    pinned_keys,
    usable,
)
from .forwards import Forwards, originator
from .pump import Listener, Pump
from .tunnel_commands import RemoteCommands

# 4 MiB windows keep a fast link busy without letting a stalled client pin much memory.
# Packets above the loopback MSS (64 KiB) matter: sshd leaves Nagle on for non-interactive
# connections, and 32 KiB packets then stall on delayed ACKs (30 MB/s instead of 200 MB/s).
DEFAULT_WINDOW_SIZE = 4 << 20
DEFAULT_MAX_PACKET_SIZE = 128 << 10


class SSHTunnel(RemoteCommands):
    """An SSH connection to one sandbox, carrying port forwards and remote commands.

    Nothing happens on construction; the connection is made by :meth:`ensure_connected`, or
    by the first connection to a forwarded port.

    Args:
        host: the sandbox's SSH address.
        port: its SSH port.
        username: the user to log in as.
        pkey: the client private key (see :func:`sandbox_kernels.ssh.keys.load_private_key`).
        host_key: the pinned host key: a paramiko key or a public line ``ssh-ed25519 AAAA...``.
        known_hosts: instead of ``host_key``, a ``known_hosts`` file whose entries for
            ``host_alias`` (default: ``host``) are pinned; for SSH hosts users already trust.
        host_alias: the name to look up in ``known_hosts``.
        keepalive: seconds between SSH keep-alives (also tunes TCP keep-alive and the TCP user
            timeout, so a dead peer is noticed in about ``4 * keepalive`` seconds).
        connect_timeout: seconds for one connection attempt (TCP, handshake, login).
        reconnect_timeout: seconds the background reconnect keeps trying after a drop.
        logger: where connection events go; defaults to this module's logger.
        window_size: the SSH window of each channel, in bytes.
        max_packet_size: the largest SSH packet the server may send us.
        sock: a connection to ``host:port`` already dialed (see :mod:`.dialed`), taken over
            for the first login attempt; a fresh dial follows at once if it is stale.

    Raises:
        SandboxConfigError: a bad argument, or no usable pinned host key.
    """

    def __init__(
        self,
        host: str,
        port: int,
        username: str,
        pkey: paramiko.PKey,
        host_key: paramiko.PKey | str | None = None,
        *,
        known_hosts: str | os.PathLike[str] | None = None,
        host_alias: str | None = None,
        keepalive: float = 5.0,
        connect_timeout: float = 10.0,
        reconnect_timeout: float = 60.0,
        logger: logging.Logger | None = None,
        window_size: int = DEFAULT_WINDOW_SIZE,
        max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
        sock: socket.socket | None = None,
    ):
        super().__init__()
        check_tunnel_args(host, port, username, pkey, keepalive, connect_timeout, reconnect_timeout)
        self._logger = logger or logging.getLogger(__name__)
        self._name = f"sandbox-ssh-{host}:{port}"
        self._connector = Connector(
            host=host,
            port=port,
            username=username,
            pkey=pkey,
            pins=pinned_keys(host_key, known_hosts, host_alias or host, port),
            pin_source=f"known_hosts file {known_hosts}" if known_hosts else "pinned key",
            keepalive=keepalive,
            window_size=window_size,
            max_packet_size=max_packet_size,
            logger=self._logger,
            thread_name=f"{self._name}-transport",
        )
        self._connect_timeout = connect_timeout
        self._reconnect_timeout = reconnect_timeout
        self._lock = threading.RLock()
        self._connect_lock = threading.Lock()
        self._closing = threading.Event()
        self._transport: paramiko.Transport | None = None
        self._generation = 0
        self._ever_connected = False
        self._gave_up = False
        self._last_error: BaseException | None = None
        self._connecting_sock: socket.socket | None = None
        self._dialed = sock  # for the first attempt only
        #: Whether the first login went over the connection given as ``sock``.
        self.used_dialed = False
        self._forwards = Forwards(self._name, self._logger, self._closing, self._keep_connected,
                                  self._on_accept, self._set_error)

    def __repr__(self) -> str:
        state = "closed" if self._closing.is_set() else "up" if self.is_alive else "down"
        return f"<SSHTunnel {self._connector.username}@{self._target} {state}>"

    def __enter__(self) -> SSHTunnel:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ connection state

    @property
    def is_alive(self) -> bool:
        """Whether the SSH connection is up and authenticated."""
        return not self._closing.is_set() and usable(self._transport)

    @property
    def last_error(self) -> BaseException | None:
        """The error that ended the last failed (re)connection, while the tunnel is down."""
        return self._last_error

    @property
    def gave_up(self) -> bool:
        """Whether the background reconnect stopped trying (after ``reconnect_timeout``, or at
        once on a host key mismatch). :meth:`ensure_connected` or :meth:`reconnect` try again.
        """
        return self._gave_up

    @property
    def thread_name(self) -> str:
        """The name of this tunnel's pump thread (its transport thread adds ``-transport``)."""
        return self._name

    @property
    def forwards(self) -> dict[int, tuple[str, int]]:
        """The open forwards: local port -> (remote host, remote port)."""
        return {port: (lis.remote_host, lis.remote_port) for port, lis in self._forwards.listeners.items()}

    def ensure_connected(self, timeout: float = 30.0) -> None:
        """Connect (or wait for the reconnect) unless the connection is already up.

        Attempts are retried with backoff until ``timeout``; a host key mismatch or a server
        without common algorithms fails at once.

        Raises:
            HostKeyMismatch: the server's host key is not the pinned one.
            SandboxConnectionError: the tunnel is closed, or the server is incompatible.
            SandboxTimeout: no connection within ``timeout`` (the message has the last error).
        """
        self._check_open()
        with self._lock:
            transport, generation = self._transport, self._generation
        if not usable(transport):
            self._connect(time.monotonic() + timeout, generation)

    def reconnect(self, timeout: float = 30.0) -> None:
        """Drop the current connection and make a new one (e.g. after a VM snapshot revert).

        Open local connections are closed; listening ports stay open.

        Raises:
            HostKeyMismatch, SandboxConnectionError, SandboxTimeout: as for
                :meth:`ensure_connected`.
        """
        self._check_open()
        with self._lock:
            transport, generation = self._transport, self._generation
        if transport is not None:
            self._logger.info("reconnecting to %s on request", self._target)
            close_transport(transport, self._logger)
        self._connect(time.monotonic() + timeout, generation)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the pump thread; close every listener, channel and the connection.

        Safe to call more than once and from any thread. Afterwards no thread of this tunnel
        runs and none of its ports listens.
        """
        with self._lock:
            self._closing.set()
            transport, self._transport = self._transport, None
            connecting = self._connecting_sock
            dialed, self._dialed = self._dialed, None
        if dialed is not None:  # never used
            dialed.close()
        if connecting is not None:
            with contextlib.suppress(OSError):
                connecting.shutdown(socket.SHUT_RDWR)
        if transport is not None:  # first, so the pump thread's paramiko calls return now
            close_transport(transport, self._logger)
        self._forwards.close(timeout)
        self._logger.debug("tunnel to %s closed", self._target)

    # ------------------------------------------------------------------ forwards

    def forward(self, local_port: int, remote_port: int, remote_host: str = "127.0.0.1",
                sock: socket.socket | None = None) -> int:
        """Listen on 127.0.0.1:``local_port`` (or a given unix socket) and forward each
        connection to the remote side.

        Connections go to ``remote_host:remote_port`` as seen from the sandbox. The listener
        is open at once; connections made while the SSH connection is down wait for it (up
        to ``reconnect_timeout``).

        Args:
            local_port: the local port, or 0 to pick a free one.
            remote_port: the port on the sandbox.
            remote_host: the address the sandbox connects to.
            sock: a listening socket reserved earlier (the tunnel takes it over): on
                127.0.0.1:``local_port`` (:func:`reserve_local_port`), or a unix socket
                (see :mod:`sandbox_kernels.client_sockets`), which ``local_port`` then only
                names; None binds 127.0.0.1:``local_port`` now.

        Returns:
            The local port.

        Raises:
            SandboxConfigError: a bad port or host.
            SandboxConnectionError: the tunnel is closed or the local port cannot be bound.
        """
        self._check_open()
        check_port(local_port, "local_port", allow_zero=True)
        check_port(remote_port, "remote_port")
        if not isinstance(remote_host, str) or not remote_host or "\0" in remote_host:
            raise SandboxConfigError(f"remote_host={remote_host!r} is not a host name")
        try:
            listener = self._forwards.add(local_port, remote_host, remote_port, sock)
        except SandboxConnectionError:
            self._check_open()
            raise
        self._logger.debug(
            "forwarding 127.0.0.1:%d to %s:%d via %s",
            listener.port, remote_host, remote_port, self._target,
        )
        return listener.port

    def close_forward(self, local_port: int, timeout: float = 5.0) -> None:
        """Stop forwarding ``local_port``: close its listener and its connections.

        Raises:
            SandboxNotFound: no forward listens on ``local_port``.
        """
        self._forwards.remove(local_port, timeout)

    def pause_forward(self, local_port: int, timeout: float = 5.0) -> None:
        """Hold new connections to ``local_port`` in its backlog; close its open ones.

        For a remote end that is going away and coming back on another port (a kernel
        restarting): clients are neither refused nor sent to a dead port meanwhile.
        :meth:`repoint_forward` resumes it.

        Raises:
            SandboxNotFound: no forward listens on ``local_port``.
        """
        self._forwards.pause(local_port, timeout)

    def repoint_forward(self, local_port: int, remote_port: int, remote_host: str = "127.0.0.1") -> None:
        """Send ``local_port``'s connections to ``remote_host:remote_port`` from now on, and
        accept again if paused. The local port and its listening socket stay.

        Raises:
            SandboxConfigError: a bad port.
            SandboxNotFound: no forward listens on ``local_port``.
        """
        self._forwards.repoint(local_port, remote_host, remote_port)
        self._logger.debug("forwarding 127.0.0.1:%d to %s:%d via %s",
                           local_port, remote_host, remote_port, self._target)

    # ------------------------------------------------------------------ connecting

    @property
    def _target(self) -> str:
        return self._connector.target

    def _check_open(self) -> None:
        if self._closing.is_set():
            raise SandboxConnectionError(f"the tunnel to {self._target} is closed")

    def _transport_for_call(self, timeout: float) -> paramiko.Transport:
        """The live transport for a remote command, connecting first if needed.

        Raises:
            HostKeyMismatch, SandboxConnectionError, SandboxTimeout: no connection.
        """
        self.ensure_connected(timeout)
        transport = self._transport
        if transport is None:
            raise SandboxConnectionError(f"the tunnel to {self._target} is closed")
        return transport

    def _connect(self, deadline: float, seen_generation: int) -> None:
        """Connect with backoff until ``deadline``, unless another thread already reconnected.

        Raises:
            HostKeyMismatch, IncompatibleServer: at once, without retrying.
            SandboxConnectionError: the tunnel was closed meanwhile.
            SandboxTimeout: ``deadline`` passed; the last error is chained.
        """
        if not self._connect_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise SandboxTimeout(f"still (re)connecting to {self._target}; try again later")
        try:
            with self._lock:
                if self._generation != seen_generation and usable(self._transport):
                    return
            self._connect_with_backoff(deadline)
        finally:
            self._connect_lock.release()

    def _connect_with_backoff(self, deadline: float) -> None:
        """Try until connected or ``deadline``; the caller holds ``_connect_lock``.

        Raises:
            As :meth:`_connect`.
        """
        while True:
            with self._lock:
                dialed, self._dialed = self._dialed, None
            transport = self._connector.open_with_backoff(deadline, self._connect_timeout, self._closing,
                                                          self._track_connecting, self._set_error, dialed)
            if dialed is not None:
                self.used_dialed = transport.sock is dialed
            try:
                self._install(transport)
                return
            except SandboxConnectionError:
                self._check_open()
                raise

    def _set_error(self, error: BaseException) -> None:
        self._last_error = error

    def _track_connecting(self, sock: socket.socket | None) -> bool:
        """Remember the socket being connected, so :meth:`close` can abort it."""
        with self._lock:
            self._connecting_sock = sock
            return not self._closing.is_set()

    def _install(self, transport: paramiko.Transport) -> None:
        """Make ``transport`` the current connection and start the pump thread.

        Raises:
            SandboxConnectionError: the tunnel was closed meanwhile.
        """
        with self._lock:
            closed = self._closing.is_set()
            old = None
            if not closed:
                old, self._transport = self._transport, transport
                self._generation += 1
                self._ever_connected, self._gave_up, self._last_error = True, False, None
                self._forwards.start_thread()
        if closed:
            close_transport(transport, self._logger)
            raise SandboxConnectionError(f"the tunnel to {self._target} is closed")
        if old is not None:
            close_transport(old, self._logger)
        self._forwards.wake()

    # ------------------------------------------------------------------ called by the pump thread

    def _keep_connected(self, pump: Pump) -> None:
        """Reconnect in the background when a connection that was up has dropped."""
        with self._lock:
            transport, generation = self._transport, self._generation
            wanted = self._ever_connected and not self._gave_up
        if not wanted or usable(transport) or self._closing.is_set():
            return
        error = transport.get_exception() if transport is not None else None
        self._logger.warning(
            "SSH connection to %s lost (%s); reconnecting for up to %.0f s",
            self._target, describe_error(error), self._reconnect_timeout,
        )
        pump.close_pairs()
        self._recover(generation)

    def _recover(self, generation: int) -> bool:
        """Reconnect within ``reconnect_timeout``; on failure stop trying until asked again."""
        try:
            self._connect(time.monotonic() + self._reconnect_timeout, generation)
            return True
        except SandboxError as e:
            if self._closing.is_set():
                return False
            with self._lock:
                self._gave_up, self._last_error = True, e
            self._logger.error(
                "gave up reconnecting to %s: %s. Local ports stay open; call reconnect() to "
                "try again.", self._target, e,
            )
            return False

    def _on_accept(self, sock: socket.socket, listener: Listener) -> None:
        """Open a channel for a new local connection: in another thread while connected; here,
        waiting for a reconnect, when not."""
        with self._lock:
            live = self._transport
        if live is not None and usable(live):
            self._forwards.open_pair(sock, listener, lambda: self._connector.open_forward_channel(
                live, listener.remote_host, listener.remote_port, originator(sock), self._connect_timeout))
            return
        transport = self._transport_for_accept()
        channel = None if transport is None else self._connector.open_forward_channel(
            transport, listener.remote_host, listener.remote_port, originator(sock), self._connect_timeout)
        if channel is None:
            sock.close()
        else:
            self._forwards.add_pair(sock, channel, listener)

    def _transport_for_accept(self) -> paramiko.Transport | None:
        with self._lock:
            transport, generation, gave_up = self._transport, self._generation, self._gave_up
        if usable(transport):
            return transport
        if gave_up or self._closing.is_set() or not self._recover(generation):
            return None
        return self._transport
