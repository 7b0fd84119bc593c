"""The forwards of one SSH tunnel: local listeners and the thread that pumps them.

:class:`Forwards` owns the listening sockets (127.0.0.1 ports, or unix sockets handed over)
and one selector thread (the tunnel's ``sandbox-ssh-<host>:<port>``) that accepts their
connections and moves bytes between them and their ``direct-tcpip`` channels
(:class:`~.pump.Pump`). How a connection becomes a channel, and keeping the SSH connection
up, stay with the tunnel (:class:`~.tunnel.SSHTunnel`), which passes them in as callbacks.

Changes to the listeners are queued for the thread (the pump is only touched from it). Channels
are opened off that thread (:meth:`Forwards.open_pair`): opening one is a round trip into the
sandbox, a kernel client connects five at once, and bytes of open connections keep moving
meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable

import paramiko

from ..client_sockets import listen_local
from ..errors import SandboxConfigError, SandboxConnectionError, SandboxNotFound
from .connect import check_port, describe_error
from .pump import Listener, Pump

_LOOP_TIMEOUT = 1.0
_MAX_LOOP_FAILURES = 5  # consecutive failed pump turns before the thread gives up
_OPENERS = 8  # channels opened at once

#: Called by the pump thread at each turn (the tunnel reconnects there), with the pump.
TurnCallback = Callable[[Pump], None]
#: Called by the pump thread for each accepted connection (the tunnel opens its channel).
AcceptCallback = Callable[[socket.socket, Listener], None]


class Forwards:
    """Listeners and their pump thread, for one tunnel.

    Args:
        name: the thread's name.
        logger: where forward events go.
        closing: set when the tunnel closes (shared with it): no new listener is accepted.
        on_turn: called at each turn of the thread, before it waits for sockets.
        on_accept: opens the channel for an accepted connection (and calls :meth:`add_pair`).
        on_failure: told about a failed turn of the thread.
    """

    def __init__(self, name: str, logger: logging.Logger, closing: threading.Event,
                 on_turn: TurnCallback, on_accept: AcceptCallback,
                 on_failure: Callable[[BaseException], None]) -> None:
        self.name = name
        self._logger = logger
        self._closing = closing
        self._on_turn = on_turn
        self._on_accept = on_accept
        self._on_failure = on_failure
        self._lock = threading.Lock()
        self._listeners: dict[int, Listener] = {}
        self._commands: deque[Callable[[Pump], None]] = deque()
        self.thread: threading.Thread | None = None
        self.pump: Pump | None = None
        self._wake_pair: tuple[socket.socket, socket.socket] | None = None
        self._openers: ThreadPoolExecutor | None = None

    @property
    def listeners(self) -> dict[int, Listener]:
        """The open listeners by local port (a copy)."""
        with self._lock:
            return dict(self._listeners)

    def add(self, local_port: int, remote_host: str, remote_port: int, sock: socket.socket | None) -> Listener:
        """Listen on ``sock`` (taken over) or 127.0.0.1:``local_port`` and forward to
        ``remote_host:remote_port``.

        Raises:
            SandboxConfigError: ``sock`` is not 127.0.0.1:``local_port`` or a unix socket.
            SandboxConnectionError: the tunnel is closed, or the port cannot be bound.
        """
        if sock is not None:
            _check_listener(sock, local_port)
            sock.setblocking(False)
        else:
            sock = listen_local(local_port)
        port = local_port if sock.family == socket.AF_UNIX else int(sock.getsockname()[1])
        listener = Listener(sock, remote_host, remote_port, port)
        with self._lock:
            if self._closing.is_set():
                listener.sock.close()
                raise SandboxConnectionError(f"the forwards of {self.name} are closed")
            self._listeners[listener.port] = listener
            self._commands.append(lambda pump: pump.add_listener(listener))
        self.start_thread()
        self.wake()
        return listener

    def remove(self, local_port: int, timeout: float = 5.0) -> None:
        """Close ``local_port``'s listener and connections.

        Raises:
            SandboxNotFound: no forward listens on ``local_port``.
        """
        with self._lock:
            if self._listeners.pop(local_port, None) is None:
                raise SandboxNotFound(f"no forward listens on local port {local_port}")
            done = self._queue(lambda pump: pump.remove_listener(local_port))
        self.wake()
        if not done.wait(timeout):
            self._logger.warning("closing the forward on port %d timed out", local_port)

    def pause(self, local_port: int, timeout: float = 5.0) -> None:
        """Hold new connections to ``local_port`` in its backlog; close its open ones.

        Raises:
            SandboxNotFound: no forward listens on ``local_port``.
        """
        with self._lock:
            if local_port not in self._listeners:
                raise SandboxNotFound(f"no forward listens on local port {local_port}")
            done = self._queue(lambda pump: pump.pause_listener(local_port))
            running = self.thread is not None and self.thread.is_alive()
        self.wake()
        # Return once it holds, so a connection made next waits (unless no pump runs yet).
        if running and not done.wait(timeout):
            self._logger.warning("pausing the forward on port %d timed out", local_port)

    def repoint(self, local_port: int, remote_host: str, remote_port: int) -> None:
        """Send ``local_port``'s connections to ``remote_host:remote_port`` from now on; accept
        again if paused.

        Raises:
            SandboxConfigError: a bad port.
            SandboxNotFound: no forward listens on ``local_port``.
        """
        check_port(remote_port, "remote_port")
        with self._lock:
            old = self._listeners.get(local_port)
            if old is None:
                raise SandboxNotFound(f"no forward listens on local port {local_port}")
            listener = Listener(old.sock, remote_host, remote_port, old.port)
            self._listeners[local_port] = listener
            self._commands.append(lambda pump: pump.repoint_listener(local_port, listener))
        self.wake()

    def add_pair(self, sock: socket.socket, channel: paramiko.Channel, listener: Listener) -> None:
        """Pump ``sock`` <-> ``channel`` (from the pump thread, in ``on_accept``)."""
        assert self.pump is not None
        self.pump.add_pair(sock, channel, listener)

    def open_pair(self, sock: socket.socket, listener: Listener,
                  open_channel: Callable[[], paramiko.Channel | None]) -> None:
        """Open ``sock``'s channel with ``open_channel`` in another thread, then pump the pair,
        unless ``listener`` was paused, removed or pointed elsewhere meanwhile (then both
        close, as its open connections did). ``sock`` closes if no channel opens."""
        with self._lock:
            if self._closing.is_set():
                sock.close()
                return
            if self._openers is None:
                self._openers = ThreadPoolExecutor(_OPENERS, thread_name_prefix=f"{self.name}-open")
            openers = self._openers

        def run() -> None:
            try:
                channel = open_channel()
            except Exception as e:  # nobody waits for this thread: say it here
                self._logger.warning("opening a channel for local port %d failed: %s", listener.port,
                                     describe_error(e), exc_info=True)
                channel = None
            if channel is None:
                sock.close()
                return
            with self._lock:
                closed = self._closing.is_set()
                if not closed:
                    self._commands.append(lambda pump: pump.add_pair_if_current(sock, channel, listener))
            if closed:
                sock.close()
                channel.close()
            else:
                self.wake()

        try:
            openers.submit(run)
        except RuntimeError:  # shut down: the tunnel is closing
            sock.close()

    def _queue(self, command: Callable[[Pump], None]) -> threading.Event:
        """Queue ``command`` for the pump thread (the caller holds ``_lock``); the returned
        event is set once it has run."""
        done = threading.Event()

        def run(pump: Pump) -> None:
            command(pump)
            done.set()

        self._commands.append(run)
        return done

    # -- the thread -----------------------------------------------------------------------------

    def start_thread(self) -> None:
        """Start the pump thread once (not after closing)."""
        with self._lock:
            if self.thread is not None or self._closing.is_set():
                return
            self._wake_pair = socket.socketpair()
            for sock in self._wake_pair:
                sock.setblocking(False)
            self.pump = Pump(self._logger, self._wake_pair[0])
            self.thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self.thread.start()

    def wake(self) -> None:
        """Make the pump thread look at its queue (and the connection) now."""
        with self._lock:
            pair = self._wake_pair
        if pair is not None:
            with contextlib.suppress(OSError):
                pair[1].send(b"\0")

    def _run(self) -> None:
        pump = self.pump
        assert pump is not None
        failures = 0
        try:
            while not self._closing.is_set():
                try:
                    self._run_commands(pump)
                    self._on_turn(pump)
                    pump.run_once(_LOOP_TIMEOUT, self._on_accept)
                    failures = 0
                except Exception as e:
                    # One bad turn (a paramiko call racing a dying connection, say) must not
                    # stop every forward: drop the open connections and carry on, unless the
                    # failure repeats, which means a bug rather than a race.
                    failures += 1
                    self._on_failure(e)
                    if failures >= _MAX_LOOP_FAILURES:
                        self._logger.exception("tunnel thread %s failed %d times in a row; forwards stop",
                                               self.name, failures)
                        return
                    self._logger.warning("tunnel thread %s: %s; closing open connections and going on",
                                         self.name, describe_error(e), exc_info=True)
                    pump.close_pairs()
                    self._closing.wait(0.1 * failures)
        finally:
            pump.close()

    def _run_commands(self, pump: Pump) -> None:
        while True:
            with self._lock:
                if not self._commands:
                    return
                command = self._commands.popleft()
            command(pump)

    def close(self, timeout: float) -> None:
        """Stop the thread (``closing`` is set) and close every listener."""
        self.wake()
        thread = self.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                self._logger.warning("tunnel thread %s did not stop in time", self.name)
        with self._lock:
            listeners = list(self._listeners.values())
            self._listeners.clear()
            self._commands.clear()
            wake_pair, self._wake_pair = self._wake_pair, None
            openers, self._openers = self._openers, None
        if openers is not None:  # an open under way ends with the transport (closed first)
            openers.shutdown(wait=True, cancel_futures=True)
        for listener in listeners:
            listener.sock.close()
        for sock in wake_pair or ():
            sock.close()


def reserve_local_port() -> socket.socket:
    """A listening socket on a free 127.0.0.1 port, held until a forward takes it over.

    Binding a port only when the sandbox is up (after a VM boot, say) races with everything
    else on the machine, outgoing connections' ephemeral ports included; holding it open from
    the start does not.

    Raises:
        SandboxConnectionError: no port could be bound.
    """
    return listen_local(0)


def originator(sock: socket.socket) -> tuple[str, int]:
    """The ``direct-tcpip`` originator of a local connection (a unix peer has no address)."""
    if sock.family == socket.AF_UNIX:
        return ("127.0.0.1", 0)
    host, port = sock.getpeername()[:2]
    return (host, port)


def _check_listener(sock: socket.socket, local_port: int) -> None:
    """A reserved socket must listen on 127.0.0.1:``local_port`` or on a unix socket.

    Raises:
        SandboxConfigError: it does not.
    """
    if sock.family == socket.AF_UNIX:
        return
    if sock.family != socket.AF_INET or sock.getsockname()[:2] != ("127.0.0.1", local_port):
        raise SandboxConfigError(f"the reserved socket is not 127.0.0.1:{local_port} or a unix socket")
