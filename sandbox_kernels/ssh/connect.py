"""Open one authenticated paramiko ``Transport``: dial, handshake, pinned host key, login.

:class:`Connector` makes one attempt (:meth:`Connector.open`) or retries with backoff until a
deadline (:meth:`Connector.open_with_backoff`); the tunnel's state is the business of
:class:`sandbox_kernels.ssh.tunnel.SSHTunnel`. The server's host key is compared
with the pinned keys right after the key exchange, before any credential is sent; there is no
"accept unknown keys" mode.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import paramiko

from ..errors import HostKeyMismatch, SandboxConfigError, SandboxConnectionError, SandboxError, SandboxTimeout
from .keys import describe_key, host_key_algorithms, known_host_keys, parse_public_key

_KEEPALIVE_PROBES = 4
_FIRST_BACKOFF = 0.2
_MAX_BACKOFF = 5.0


class IncompatibleServer(SandboxConnectionError):
    """The server and paramiko share no algorithm (kex, host key, cipher, MAC)."""


@dataclass(frozen=True)
class Connector:
    """Everything needed to open a transport to one SSH server.

    Attributes:
        host: the server address.
        port: its port.
        username: the user to log in as.
        pkey: the client private key.
        pins: the accepted host keys.
        pin_source: where the pins came from, for messages ("pinned key", "known_hosts ...").
        keepalive: seconds between keep-alives (SSH and TCP).
        window_size: default channel window, bytes.
        max_packet_size: default largest packet the server may send, bytes.
        logger: where the connection is logged; paramiko logs under ``<logger>.paramiko``.
        thread_name: the name given to paramiko's transport thread.
    """

    host: str
    port: int
    username: str
    pkey: paramiko.PKey = field(repr=False)
    pins: tuple[paramiko.PKey, ...]
    pin_source: str
    keepalive: float
    window_size: int
    max_packet_size: int
    logger: logging.Logger
    thread_name: str

    @property
    def target(self) -> str:
        """``host:port``."""
        return f"{self.host}:{self.port}"

    def open(
        self, timeout: float, track: Callable[[socket.socket | None], bool],
        dialed: socket.socket | None = None,
    ) -> paramiko.Transport:
        """Connect, check the host key, log in; one attempt.

        Args:
            timeout: seconds for each of TCP connect, handshake and login.
            track: called with the TCP socket once connected (so another thread can shut it
                down to abort) and with ``None`` at the end; returning ``False`` aborts.
            dialed: a connection to the server already made (see :mod:`.dialed`), used
                instead of dialing; it is closed on failure.

        Returns:
            An authenticated transport with keep-alive on.

        Raises:
            HostKeyMismatch: the server's host key is not pinned.
            IncompatibleServer: no common algorithm.
            SandboxTimeout: the handshake did not finish in ``timeout``.
            SandboxConnectionError: any other TCP or SSH failure, or aborted by ``track``.
        """
        if dialed is not None:
            dialed.settimeout(timeout)
            tune_socket(dialed, self.keepalive)
        sock = dialed if dialed is not None else self._dial(timeout)
        transport = None
        try:
            if not track(sock):
                raise SandboxConnectionError(f"the tunnel to {self.target} is closed")
            transport = paramiko.Transport(
                sock,
                default_window_size=self.window_size,
                default_max_packet_size=self.max_packet_size,
            )
            self._configure(transport, timeout)
            self._handshake(transport, timeout)
            host_key = self._verify_host_key(transport)
            self._authenticate(transport)
            transport.set_keepalive(max(1, round(self.keepalive)))
        except BaseException:
            if transport is not None:
                close_transport(transport, self.logger)
            sock.close()
            raise
        finally:
            track(None)
        self.logger.debug(
            "connected to %s as %r (host key %s)",
            self.target, self.username, describe_key(host_key),
        )
        return transport

    def _dial(self, timeout: float) -> socket.socket:
        """Open the TCP connection with Nagle off and dead-peer detection on.

        Raises:
            SandboxConnectionError: the connection failed.
        """
        try:
            sock = socket.create_connection((self.host, self.port), timeout=timeout)
        except OSError as e:
            raise SandboxConnectionError(f"cannot connect to {self.target}: {e}") from e
        tune_socket(sock, self.keepalive)
        return sock

    def _configure(self, transport: paramiko.Transport, timeout: float) -> None:
        transport.name = self.thread_name
        transport.set_log_channel(f"{self.logger.name}.paramiko")
        # paramiko narrates every handshake at INFO; keep its warnings and errors only, less the
        # per-channel refusals (the tunnel logs those itself, at debug level).
        paramiko_log = logging.getLogger(f"{self.logger.name}.paramiko")
        paramiko_log.setLevel(logging.WARNING)
        if not any(isinstance(f, _ChannelRefusals) for f in paramiko_log.filters):
            paramiko_log.addFilter(_ChannelRefusals())
        transport.banner_timeout = transport.handshake_timeout = timeout
        transport.auth_timeout = timeout
        transport.get_security_options().key_types = host_key_algorithms(self.pins)

    def _handshake(self, transport: paramiko.Transport, timeout: float) -> None:
        """Negotiate algorithms and keys.

        Raises:
            IncompatibleServer: no common algorithm (paramiko's reason in the message).
            SandboxTimeout: the handshake did not finish in ``timeout``.
            SandboxConnectionError: the connection failed during the handshake.
        """
        try:
            transport.start_client(timeout=timeout)
            transport.get_remote_server_key()
        except paramiko.IncompatiblePeer as e:
            raise IncompatibleServer(
                f"SSH server {self.target} and this client share no acceptable algorithm: {e}. "
                f"Host key types accepted (from the {self.pin_source}): "
                f"{', '.join(host_key_algorithms(self.pins))}."
            ) from e
        except (paramiko.SSHException, OSError, EOFError) as e:
            if transport.is_active():
                raise SandboxTimeout(f"SSH handshake with {self.target} timed out") from e
            raise SandboxConnectionError(
                f"SSH handshake with {self.target} failed: {describe_error(e)}"
            ) from e

    def _verify_host_key(self, transport: paramiko.Transport) -> paramiko.PKey:
        """Compare the server's host key with the pins, before any credential is sent.

        Returns:
            The server's (matching) host key.

        Raises:
            HostKeyMismatch: no pin matches; the message has both fingerprints.
        """
        received = transport.get_remote_server_key()
        if any(received.asbytes() == pin.asbytes() for pin in self.pins):
            return received
        expected = ", ".join(describe_key(pin) for pin in self.pins)
        raise HostKeyMismatch(
            f"SSH host key of {self.target} does not match the {self.pin_source}: expected "
            f"{expected}, received {describe_key(received)}. The connection was closed before "
            "logging in. If the sandbox was re-created or its SSH server got a new host key, "
            "pin the new key (re-create the sandbox's keys, or update the known_hosts entry); "
            "otherwise something may be intercepting the connection: do not connect."
        )

    def _authenticate(self, transport: paramiko.Transport) -> None:
        """Log in with the client key.

        Raises:
            SandboxConnectionError: the server refused the key or public-key login.
        """
        who = f"{self.username!r} on {self.target}"
        try:
            transport.auth_publickey(self.username, self.pkey)
        except paramiko.BadAuthenticationType as e:
            raise SandboxConnectionError(
                f"{who} does not accept public-key login (allowed: {e.allowed_types})"
            ) from e
        except paramiko.AuthenticationException as e:
            raise SandboxConnectionError(
                f"{who} refused the client key {describe_key(self.pkey)}: {e}. "
                "Check that its public line is in the user's authorized_keys."
            ) from e
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise SandboxConnectionError(f"logging in as {who} failed: {describe_error(e)}") from e
        if not transport.is_authenticated():
            raise SandboxConnectionError(f"{who} asks for more than a public key to log in")


    def open_forward_channel(self, transport: paramiko.Transport, host: str, port: int,
                             origin: tuple[str, int], timeout: float) -> paramiko.Channel | None:
        """A ``direct-tcpip`` channel to ``host:port`` as seen from the server, with this
        connector's window and packet sizes; None (logged) if the server refuses it."""
        try:
            return transport.open_channel("direct-tcpip", (host, port), origin, window_size=self.window_size,
                                          max_packet_size=self.max_packet_size, timeout=timeout)
        except (paramiko.SSHException, OSError, EOFError) as e:
            self.logger.debug("cannot open a channel to %s:%d: %s", host, port, describe_error(e))
            return None

    def open_with_backoff(self, deadline: float, attempt_timeout: float, closing: threading.Event,
                          track: Callable[[socket.socket | None], bool],
                          on_error: Callable[[BaseException], None],
                          dialed: socket.socket | None = None) -> paramiko.Transport:
        """Attempt :meth:`open` with backoff until one succeeds or ``deadline`` passes; the
        first attempt uses ``dialed`` if given, and if that fails a fresh dial follows at once.

        Args:
            deadline: ``time.monotonic()`` value to give up at.
            attempt_timeout: seconds for one attempt (less near the deadline).
            closing: set when the caller closes: stop at once.
            track: as for :meth:`open`.
            on_error: told each attempt's error.

        Raises:
            HostKeyMismatch, IncompatibleServer: at once, without retrying.
            SandboxConnectionError: ``closing`` was set.
            SandboxTimeout: ``deadline`` passed; the last error is chained.
        """
        delay, attempts = _FIRST_BACKOFF, 0
        last: SandboxError | None = None
        while True:
            if closing.is_set():
                if dialed is not None:
                    dialed.close()
                raise SandboxConnectionError(f"the tunnel to {self.target} is closed")
            attempts += 1
            first, dialed = dialed, None
            try:
                return self.open(max(0.5, min(attempt_timeout, deadline - time.monotonic())), track, first)
            except (HostKeyMismatch, IncompatibleServer) as e:
                on_error(e)
                raise
            except SandboxError as e:
                last = e
                on_error(e)
                self.logger.debug("attempt %d to reach %s failed: %s", attempts, self.target, e)
                if first is not None:
                    continue  # the connection dialed ahead had gone stale: dial now, no pause
            if time.monotonic() + delay >= deadline:
                raise SandboxTimeout(
                    f"could not connect to {self.target} as {self.username!r} "
                    f"({attempts} attempts); last error: {last}"
                ) from last
            closing.wait(delay)
            delay = min(delay * 2, _MAX_BACKOFF)

def close_transport(transport: paramiko.Transport, logger: logging.Logger) -> None:
    """Close ``transport`` and wait (briefly) for its thread to end."""
    try:
        transport.close()
    except (OSError, EOFError, paramiko.SSHException) as e:
        logger.debug("closing the SSH transport: %s", describe_error(e))
    if transport.is_alive() and transport is not threading.current_thread():
        transport.join(5.0)


def usable(transport: paramiko.Transport | None) -> bool:
    """Whether ``transport`` is up and authenticated."""
    return transport is not None and transport.is_active() and transport.is_authenticated()


def describe_error(error: BaseException | None) -> str:
    """A non-empty text for an exception (``EOFError()`` has none)."""
    if error is None:
        return "closed"
    return str(error) or type(error).__name__


def pinned_keys(
    host_key: paramiko.PKey | str | None,
    known_hosts: str | os.PathLike[str] | None,
    alias: str,
    port: int,
) -> tuple[paramiko.PKey, ...]:
    """Resolve the pinned host keys from exactly one of ``host_key`` and ``known_hosts``.

    Raises:
        SandboxConfigError: neither or both given, or the key cannot be parsed or found.
    """
    if (host_key is None) == (known_hosts is None):
        raise SandboxConfigError(
            "give exactly one of host_key (the sandbox's public host key) and known_hosts; "
            "host keys are always checked"
        )
    if known_hosts is not None:
        return tuple(known_host_keys(known_hosts, alias, port))
    if isinstance(host_key, str):
        return (parse_public_key(host_key),)
    if isinstance(host_key, paramiko.PKey):
        return (host_key,)
    raise SandboxConfigError(
        f"host_key must be a paramiko key or a public key line, not {host_key!r}"
    )


def check_port(port: int, name: str, allow_zero: bool = False) -> None:
    """Check a TCP port number.

    Raises:
        SandboxConfigError: ``port`` is not an int in range; the message names ``name``.
    """
    low = 0 if allow_zero else 1
    if isinstance(port, bool) or not isinstance(port, int) or not low <= port <= 65535:
        raise SandboxConfigError(f"{name}={port!r} is not a TCP port ({low}-65535)")


def tune_socket(sock: socket.socket, keepalive: float) -> None:
    """Disable Nagle; let the kernel notice a dead peer within about 4 keep-alive periods."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    seconds = max(1, round(keepalive))
    for option, value in (
        ("TCP_KEEPIDLE", seconds),
        ("TCP_KEEPINTVL", seconds),
        ("TCP_KEEPCNT", _KEEPALIVE_PROBES),
        ("TCP_USER_TIMEOUT", seconds * _KEEPALIVE_PROBES * 1000),
    ):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


def check_tunnel_args(
    host: str,
    port: int,
    username: str,
    pkey: paramiko.PKey,
    keepalive: float,
    connect_timeout: float,
    reconnect_timeout: float,
) -> None:
    """Validate the constructor arguments.

    Raises:
        SandboxConfigError: the first bad argument, by name.
    """
    if not isinstance(host, str) or not host or any(c.isspace() or c == "\0" for c in host):
        raise SandboxConfigError(f"host={host!r} is not a host name or address")
    check_port(port, "port")
    if not isinstance(username, str) or not username or "\0" in username:
        raise SandboxConfigError(f"username={username!r} is not a user name")
    if not isinstance(pkey, paramiko.PKey) or not pkey.can_sign():
        raise SandboxConfigError("pkey must be a paramiko private key (see load_private_key)")
    for name, value in (
        ("keepalive", keepalive),
        ("connect_timeout", connect_timeout),
        ("reconnect_timeout", reconnect_timeout),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise SandboxConfigError(f"{name}={value!r} must be a positive number of seconds")


class _ChannelRefusals(logging.Filter):
    """Drop paramiko's "Secsh channel N open FAILED" errors: a forward to a port nobody
    listens on yet (a kernel restarting) is routine, not an error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "open FAILED" not in record.getMessage()
