"""One selector that moves bytes between local connections (TCP or unix) and SSH channels.

A :class:`Pump` belongs to one tunnel thread and is only touched from it. It watches the
listening sockets, the accepted local sockets and the channels (a paramiko ``Channel`` has a
``fileno()`` that becomes readable when data, EOF or close arrive). Sending to a channel can
stall on the SSH window, which has no file descriptor, so while such data is pending the pump
polls with a short timeout. Every byte read from one side is buffered until the other side
took it all; buffers are bounded, and a full buffer stops reading its source, so SSH flow
control reaches the local peer and back.

EOF is passed on as a half-close once the bytes before it are delivered (local FIN becomes
SSH EOF, SSH EOF becomes ``shutdown(SHUT_WR)``), as OpenSSH does, so a peer that half-closes
still gets its reply. The pair is closed when both directions have ended, when the remote
closed the channel outright, or at once on an error (connection reset, transport lost).
"""

from __future__ import annotations

import errno
import logging
import selectors
import socket
from collections.abc import Callable
from dataclasses import dataclass

import paramiko

_READ_SIZE = 1 << 18
_HIGH_WATER = 1 << 22
_TAKE_ALL = 1 << 31
_SEND_BURST = 1 << 22
_WINDOW_POLL = 0.005
_READ = selectors.EVENT_READ
_WRITE = selectors.EVENT_WRITE


@dataclass(frozen=True)
class Listener:
    """A local listening socket and where its connections go on the remote side.

    ``port`` names the forward: the TCP port, or for a unix socket the number the caller
    gave it (its ipc "port").
    """

    sock: socket.socket
    remote_host: str
    remote_port: int
    port: int


AcceptCallback = Callable[[socket.socket, Listener], None]


class _Pair:
    """One local connection and its channel, with the bytes in flight each way."""

    def __init__(self, sock: socket.socket, channel: paramiko.Channel, listener: Listener):
        self.sock = sock
        self.channel = channel
        self.listener = listener
        self.sock_fd = sock.fileno()
        self.chan_fd = channel.fileno()
        self.to_channel = bytearray()
        self.to_sock = bytearray()
        self.sock_eof = False
        self.chan_eof = False
        self.eof_sent_to_channel = False
        self.eof_sent_to_sock = False
        self.broken = False
        self.events: dict[int, int] = {self.sock_fd: 0, self.chan_fd: 0}

    def finished(self) -> bool:
        """Whether the pair can be closed: an error, or both directions ended and delivered."""
        if self.broken:
            return True
        if self.eof_sent_to_channel and self.eof_sent_to_sock:
            return True
        # The remote closed the channel completely: nothing more can go that way.
        return self.channel.closed and self.eof_sent_to_sock


class Pump:
    """Accepts local connections and pumps every pair in a single selector.

    Args:
        logger: where connection events go (at debug level).
        wake_sock: the reading end of a socket pair; a byte written to the other end wakes
            :meth:`run_once`.
    """

    def __init__(self, logger: logging.Logger, wake_sock: socket.socket):
        self._logger = logger
        self._selector = selectors.DefaultSelector()
        self._wake_sock = wake_sock
        self._selector.register(wake_sock, _READ, ("wake", None))
        self._listeners: dict[int, Listener] = {}
        self._paused: set[int] = set()
        self._pairs: set[_Pair] = set()

    @property
    def pair_count(self) -> int:
        """How many local connections are being pumped."""
        return len(self._pairs)

    def add_listener(self, listener: Listener) -> None:
        """Start accepting on ``listener`` (a non-blocking listening socket)."""
        self._listeners[listener.port] = listener
        self._selector.register(listener.sock, _READ, ("listen", listener))

    def remove_listener(self, port: int) -> None:
        """Stop accepting on ``port``, close its socket and all its pairs."""
        listener = self._listeners.pop(port, None)
        if listener is None:
            return
        if port not in self._paused:
            self._selector.unregister(listener.sock)
        self._paused.discard(port)
        listener.sock.close()
        self._close_pairs_of(listener)

    def pause_listener(self, port: int) -> None:
        """Stop accepting on ``port`` and close its pairs; the socket stays open.

        New connections wait in the socket's backlog (their TCP handshake is complete) until
        :meth:`repoint_listener` resumes it, so clients reach the new remote port the moment
        it exists instead of being refused over and over meanwhile.
        """
        listener = self._listeners.get(port)
        if listener is None or port in self._paused:
            return
        self._selector.unregister(listener.sock)
        self._paused.add(port)
        self._close_pairs_of(listener)

    def repoint_listener(self, port: int, listener: Listener) -> None:
        """Send ``port``'s new connections to ``listener``'s remote end and accept again.

        Open pairs of the old destination are closed; ``listener.sock`` is the same socket.
        """
        old = self._listeners.get(port)
        if old is None:
            return
        self._listeners[port] = listener
        if port in self._paused:
            self._paused.discard(port)
            self._selector.register(listener.sock, _READ, ("listen", listener))
        else:
            self._selector.modify(listener.sock, _READ, ("listen", listener))
        if (old.remote_host, old.remote_port) != (listener.remote_host, listener.remote_port):
            self._close_pairs_of(old)

    def _close_pairs_of(self, listener: Listener) -> None:
        for pair in [p for p in self._pairs if p.listener is listener]:
            self._close_pair(pair)

    def add_pair_if_current(self, sock: socket.socket, channel: paramiko.Channel, listener: Listener) -> None:
        """:meth:`add_pair`, for a channel opened while the pump went on: if ``listener``'s port
        was paused, removed or pointed elsewhere meanwhile, close both instead."""
        current = self._listeners.get(listener.port)
        if (current is None or listener.port in self._paused
                or (current.remote_host, current.remote_port) != (listener.remote_host, listener.remote_port)):
            self._logger.debug("dropping a connection to local port %d: its forward changed", listener.port)
            sock.close()
            channel.close()
            return
        self.add_pair(sock, channel, listener)

    def add_pair(self, sock: socket.socket, channel: paramiko.Channel, listener: Listener) -> None:
        """Start pumping between the accepted ``sock`` and its new ``channel``."""
        sock.setblocking(False)
        channel.settimeout(0.0)
        pair = _Pair(sock, channel, listener)
        self._pairs.add(pair)
        self._settle(pair)

    def run_once(self, timeout: float, on_accept: AcceptCallback) -> None:
        """Wait up to ``timeout`` seconds for events, then move every byte that can move.

        Args:
            timeout: the longest wait when nothing happens; shortened while a channel's send
                window is full.
            on_accept: called with each newly accepted local socket and its listener.
        """
        if any(p.to_channel for p in self._pairs):
            timeout = min(timeout, _WINDOW_POLL)
        touched: set[_Pair] = set()
        for key, mask in self._selector.select(timeout):
            kind, obj = key.data
            if kind == "wake":
                self._drain_wake()
            elif kind == "listen":
                self._accept(obj, on_accept)
            elif kind == "sock":
                self._on_sock(obj, mask)
                touched.add(obj)
            else:
                self._read_channel(obj)
                touched.add(obj)
        for pair in [p for p in self._pairs if p.to_channel]:
            self._write_channel(pair)
            touched.add(pair)
        for pair in touched:
            self._settle(pair)

    def close_pairs(self) -> None:
        """Close every local connection and channel (the listeners stay)."""
        for pair in list(self._pairs):
            self._close_pair(pair)

    def close(self) -> None:
        """Close all pairs, all listeners and the selector."""
        self.close_pairs()
        for port in list(self._listeners):
            self.remove_listener(port)
        self._selector.close()

    def _drain_wake(self) -> None:
        try:
            while self._wake_sock.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _accept(self, listener: Listener, on_accept: AcceptCallback) -> None:
        for _ in range(64):
            try:
                sock, peer = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._logger.warning("cannot accept on port %d: %s", listener.port, e)
                return
            if sock.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._logger.debug("accepted %r on local port %d", peer, listener.port)
            on_accept(sock, listener)

    def _on_sock(self, pair: _Pair, mask: int) -> None:
        if mask & _WRITE:
            self._write_sock(pair)
        if mask & _READ and not pair.sock_eof:
            self._read_sock(pair)

    def _read_sock(self, pair: _Pair) -> None:
        try:
            data = pair.sock.recv(_READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pair.broken = True
            return
        if not data:
            pair.sock_eof = True
            return
        pair.to_channel += data
        self._write_channel(pair)

    def _write_channel(self, pair: _Pair) -> None:
        sent_total = 0
        while pair.to_channel and sent_total < _SEND_BURST and not pair.broken:
            try:
                chunk = bytes(pair.to_channel[: pair.channel.out_max_packet_size])
                sent = pair.channel.send(chunk)
            except TimeoutError:
                return  # the SSH window is full: retry on the next poll
            except (OSError, EOFError, paramiko.SSHException):
                pair.broken = True
                return
            if sent == 0:
                pair.broken = True
                return
            del pair.to_channel[:sent]
            sent_total += sent

    def _read_channel(self, pair: _Pair) -> None:
        if pair.chan_eof:
            return
        try:
            data = pair.channel.recv(_TAKE_ALL)
        except TimeoutError:
            return
        except (OSError, EOFError, paramiko.SSHException):
            pair.broken = True
            return
        if not data:
            pair.chan_eof = True
            return
        pair.to_sock += data
        self._write_sock(pair)

    def _write_sock(self, pair: _Pair) -> None:
        while pair.to_sock:
            try:
                sent = pair.sock.send(pair.to_sock)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                pair.broken = True
                return
            del pair.to_sock[:sent]

    def _settle(self, pair: _Pair) -> None:
        """Close a finished pair, or update what the selector watches for it."""
        if pair not in self._pairs:
            return
        self._pass_eof(pair)
        if pair.finished():
            self._close_pair(pair)
            return
        sock_events = _WRITE if pair.to_sock else 0
        if not pair.sock_eof and len(pair.to_channel) < _HIGH_WATER:
            sock_events |= _READ
        chan_events = _READ if not pair.chan_eof and len(pair.to_sock) < _HIGH_WATER else 0
        self._watch(pair, pair.sock_fd, sock_events, ("sock", pair))
        self._watch(pair, pair.chan_fd, chan_events, ("chan", pair))

    def _pass_eof(self, pair: _Pair) -> None:
        """Half-close the other side once everything before an EOF is delivered."""
        if pair.sock_eof and not pair.to_channel and not pair.eof_sent_to_channel:
            pair.eof_sent_to_channel = True
            try:
                pair.channel.shutdown_write()
            except (OSError, EOFError, paramiko.SSHException):
                pair.broken = True
        if pair.chan_eof and not pair.to_sock and not pair.eof_sent_to_sock:
            pair.eof_sent_to_sock = True
            try:
                pair.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pair.broken = True

    def _watch(self, pair: _Pair, fd: int, events: int, data: tuple[str, _Pair]) -> None:
        old = pair.events[fd]
        if events == old:
            return
        if not old:
            self._selector.register(fd, events, data)
        elif not events:
            self._selector.unregister(fd)
        else:
            self._selector.modify(fd, events, data)
        pair.events[fd] = events

    def _close_pair(self, pair: _Pair) -> None:
        self._pairs.discard(pair)
        for fd in (pair.sock_fd, pair.chan_fd):
            if pair.events[fd]:
                self._selector.unregister(fd)
                pair.events[fd] = 0
        pair.sock.close()
        try:
            pair.channel.close()
        except (OSError, EOFError, paramiko.SSHException):
            # The connection died under the channel: there is nothing left to tell the server.
            pair.broken = True
        self._logger.debug(
            "closed a connection on local port %d (%s)",
            pair.listener.port,
            "error" if pair.broken else "ended",
        )
