"""Local listeners carried to a pod's ports over the API server's port-forward.

Each forward is a socket listening on 127.0.0.1, or a unix socket handed over by the caller
(see :mod:`sandbox_kernels.client_sockets`). Every connection accepted there opens its
own port-forward websocket to the pod's port (the API the ``kubectl port-forward`` command
uses) and a thread moves bytes both ways, speaking the stream's channel protocol itself:
channel 0 carries data, channel 1 errors, and the first frame on each names the port. When a
stream ends or breaks in any way (API server restart, kernel restart, TLS error) its local
connection is closed; the listener stays, and the next connection (ZMQ reconnects by itself)
opens a new stream. So forwards are re-established on demand and the local ports never change.

The kubernetes client's own ``portforward`` helper is not used: its proxy thread dies on a
TLS error without closing the local end, which would leave a ZMQ connection hanging.
"""

from __future__ import annotations

import contextlib
import logging
import select
import selectors
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any

from ...errors import SandboxConnectionError, SandboxError, SandboxNotFound
from ...client_sockets import listen_local

_READ_SIZE = 1 << 16
_HIGH_WATER = 1 << 22
_ACCEPT_POLL = 1.0

_DATA, _ERROR = 0, 1

#: Opens one port-forward websocket to a pod port (``KubeAPI.open_port_forward``, bound).
StreamOpener = Callable[[int], Any]


class PortForwarder:
    """Local listeners whose connections go to ports of one pod.

    The API blocks and is thread-safe; :meth:`close` stops every thread it started.

    Args:
        open_stream: opens one port-forward websocket to a pod port
            (``KubeAPI.open_port_forward`` bound to the pod).
        name: a name for threads and log lines (the pod name).
        logger: where connection events go.
    """

    def __init__(self, open_stream: StreamOpener, name: str, logger: logging.Logger | None = None):
        self._open_stream = open_stream
        self._name = name
        self._log = logger or logging.getLogger(__name__)
        self._lock = threading.Lock()
        self._listeners: dict[int, tuple[socket.socket, int]] = {}
        self._conns: set[_Connection] = set()
        self._closed = threading.Event()
        self._selector = selectors.DefaultSelector()
        self._thread: threading.Thread | None = None

    @property
    def forwards(self) -> dict[int, int]:
        """Open forwards: local port -> pod port."""
        with self._lock:
            return {port: target for port, (_, target) in self._listeners.items()}

    def forward(self, local_port: int, pod_port: int, sock: socket.socket | None = None) -> int:
        """Listen on 127.0.0.1:``local_port`` (0: any free port) and carry connections to
        ``pod_port``; if ``local_port`` is already forwarded, point it at ``pod_port``.

        Args:
            local_port: the local port, or the number naming a unix socket's forward.
            pod_port: the port in the pod.
            sock: a listening socket to take over (a unix socket, or 127.0.0.1:``local_port``);
                None binds 127.0.0.1:``local_port`` now. Closed here if not used.

        Returns:
            The local port.

        Raises:
            SandboxConnectionError: the forwarder is closed or the port cannot be bound.
        """
        with self._lock:
            if self._closed.is_set():
                if sock is not None:
                    sock.close()
                raise SandboxConnectionError(f"the port forwards to {self._name} are closed")
            if local_port in self._listeners:
                if sock is not None and sock is not self._listeners[local_port][0]:
                    sock.close()
                listening, _ = self._listeners[local_port]
                self._listeners[local_port] = (listening, pod_port)
                return local_port
            if sock is None:
                sock = listen_local(local_port)
            sock.setblocking(False)
            port = local_port if sock.family == socket.AF_UNIX else int(sock.getsockname()[1])
            self._listeners[port] = (sock, pod_port)
            self._selector.register(sock, selectors.EVENT_READ, port)
            if self._thread is None:
                self._thread = threading.Thread(target=self._accept_loop, daemon=True,
                                                name=f"sandbox-k8s-forward-{self._name}")
                self._thread.start()
        self._log.info("forwarding local %s to port %d of pod %s", sock.getsockname(), pod_port, self._name)
        return port

    def repoint(self, local_port: int, pod_port: int) -> None:
        """Carry ``local_port``'s connections to ``pod_port`` from now on; those still carried
        to its old port (a previous kernel's) are closed.

        Raises:
            SandboxNotFound: no forward listens on ``local_port``.
        """
        with self._lock:
            entry = self._listeners.get(local_port)
            if entry is None:
                raise SandboxNotFound(f"no forward listens on local port {local_port}")
            old = entry[1]
            self._listeners[local_port] = (entry[0], pod_port)
            stale = [c for c in self._conns if c.pod_port == old] if old != pod_port else []
        for conn in stale:
            conn.close()

    def pause(self) -> None:
        """The pod's ports are going away (a kernel restart): close the carried connections.
        New ones open streams that fail until :meth:`repoint`, and clients retry."""
        self.drop_connections()

    def drop_connections(self) -> None:
        """Close every carried connection (listeners stay); clients reconnect through new
        streams, e.g. to a restarted kernel."""
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            conn.close()

    def close(self, timeout: float = 5.0) -> None:
        """Close listeners and connections and join the threads. Idempotent."""
        with self._lock:
            self._closed.set()
            listeners = [sock for sock, _ in self._listeners.values()]
            self._listeners.clear()
            conns = list(self._conns)
            thread, self._thread = self._thread, None
        for conn in conns:
            conn.close()
        if thread is not None:
            thread.join(timeout)
        for sock in listeners:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(sock)
            sock.close()
        self._selector.close()
        for conn in conns:
            conn.join(timeout)

    # -- threads ------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            for key, _ in self._selector.select(_ACCEPT_POLL):
                if self._closed.is_set():
                    return
                with contextlib.suppress(BlockingIOError, OSError):
                    sock, _ = key.fileobj.accept()  # type: ignore[union-attr]
                    self._start_connection(sock, key.data)

    def _start_connection(self, sock: socket.socket, local_port: int) -> None:
        with self._lock:
            entry = self._listeners.get(local_port)
            if entry is None or self._closed.is_set():
                sock.close()
                return
            conn = _Connection(sock, entry[1], self)
            self._conns.add(conn)
        conn.start()

    def _done(self, conn: _Connection) -> None:
        with self._lock:
            self._conns.discard(conn)


class _Connection:
    """One accepted local connection and its port-forward stream."""

    def __init__(self, sock: socket.socket, pod_port: int, owner: PortForwarder):
        self.sock = sock
        self.pod_port = pod_port
        self.owner = owner
        self.stream: Any = None
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"sandbox-k8s-conn-{owner._name}:{pod_port}")

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def _run(self) -> None:
        log = self.owner._log
        try:
            try:
                self.stream = self.owner._open_stream(self.pod_port)
            except SandboxError as e:
                log.debug("port-forward to %s:%d failed: %s", self.owner._name, self.pod_port, e)
                return
            if not self._closed.is_set():
                _pump(self.sock, self.stream, self._closed)
        except (OSError, SandboxError) as e:
            log.debug("forwarded connection to port %d ended: %s", self.pod_port, e)
        except Exception as e:  # websocket-client errors (no common base): the stream is over
            log.debug("forwarded connection to port %d broke: %s", self.pod_port, e)
        finally:
            if self.stream is not None:
                with contextlib.suppress(Exception):
                    self.stream.close(timeout=1)
            self.sock.close()
            self.owner._done(self)


def _pump(local: socket.socket, ws: Any, closed: threading.Event) -> None:
    """Move bytes between ``local`` and the port-forward websocket ``ws`` until either ends
    or ``closed`` is set. Bytes for ``local`` are buffered up to a bound; past it the
    websocket is not read, so the API server's flow control slows the pod side.

    Raises:
        SandboxConnectionError: the stream reported an error (e.g. nothing listens on the
            pod port).
    """
    from websocket import ABNF

    local.setblocking(False)
    raw = ws.sock
    to_local = bytearray()
    seen_port = [False, False]  # the first frame on each channel only names the port
    while not closed.is_set():
        read_ws = len(to_local) < _HIGH_WATER
        buffered = read_ws and isinstance(raw, ssl.SSLSocket) and raw.pending() > 0
        readers = [local] + ([raw] if read_ws else [])
        writers = [local] if to_local else []
        readable, writable, _ = select.select(readers, writers, [], 0 if buffered else 0.5)
        if buffered or raw in readable:
            opcode, frame = ws.recv_data_frame(True)
            if opcode == ABNF.OPCODE_CLOSE:
                break
            if opcode in (ABNF.OPCODE_BINARY, ABNF.OPCODE_TEXT) and frame.data:
                channel, payload = frame.data[0], frame.data[1:]
                if channel in (_DATA, _ERROR) and not seen_port[channel]:
                    seen_port[channel] = True
                elif channel == _ERROR and payload:
                    raise SandboxConnectionError(f"port-forward error: {bytes(payload).decode(errors='replace')}")
                elif channel == _DATA:
                    to_local += payload
        if local in readable:
            data = local.recv(_READ_SIZE)
            if not data:
                return
            ws.send_binary(bytes((_DATA,)) + data)
        if to_local and (local in writable or not writers):
            with contextlib.suppress(BlockingIOError):
                del to_local[:local.send(to_local)]
    _flush(local, to_local)


def _flush(sock: socket.socket, data: bytearray, timeout: float = 2.0) -> None:
    """Best-effort delivery of what is left before closing."""
    if not data:
        return
    sock.settimeout(timeout)
    with contextlib.suppress(OSError):
        sock.sendall(bytes(data))
