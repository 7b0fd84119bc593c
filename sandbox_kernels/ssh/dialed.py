"""A TCP connection to an SSH server made before a login needs it.

An SSH server forks (OpenSSH re-executes itself) for each connection before it sends its
banner: about 0.3 s inside an emulated guest. A warm-pool member dials its guest's sshd ahead
(:class:`DialedAhead`), and the process that claims the member logs in over that connection
(``SSHTunnel(sock=...)``), so the banner is already waiting. The host key is checked as on any
connection. Servers drop a connection that has not logged in after ``LoginGraceTime`` (120 s
by default), so the connection is dialed again when it is older than ``max_age``.
"""

from __future__ import annotations

import socket
import time

#: Seconds after which a connection dialed ahead is replaced (well within LoginGraceTime).
MAX_AGE = 60.0


def still_open(sock: socket.socket) -> bool:
    """Whether the server has not closed ``sock`` (its banner may be waiting in it)."""
    timeout = sock.gettimeout()
    sock.setblocking(False)  # a socket with a timeout would wait for data first
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except (BlockingIOError, InterruptedError):
        return True
    except OSError:
        return False
    finally:
        sock.settimeout(timeout)


class DialedAhead:
    """One connection to ``host:port``, kept dialed; blocking calls (run them off the loop)."""

    def __init__(self, host: str, port: int, max_age: float = MAX_AGE, timeout: float = 5.0) -> None:
        self.host, self.port = host, port
        self.max_age, self.timeout = max_age, timeout
        self._sock: socket.socket | None = None
        self._dialed_at = 0.0

    @classmethod
    def received(cls, sock: socket.socket) -> DialedAhead:
        """One holding ``sock``, a connection dialed by another process (a claimed pool
        member's), to ``sock``'s peer."""
        host, port = sock.getpeername()[:2]
        ahead = cls(host, port)
        ahead._sock, ahead._dialed_at = sock, time.monotonic()
        return ahead

    def refresh(self) -> None:
        """Dial if there is no open connection younger than ``max_age``.

        Raises:
            OSError: the connection failed.
        """
        if self._sock is not None and time.monotonic() - self._dialed_at < self.max_age and still_open(self._sock):
            return
        self.close()
        self._sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        self._dialed_at = time.monotonic()

    def take(self, port: int | None = None) -> socket.socket | None:
        """The open connection, now the caller's; None if there is none, or (with ``port``)
        if it does not go to 127.0.0.1:``port``."""
        sock, self._sock = self._sock, None
        if sock is None:
            return None
        if not still_open(sock) or (port is not None and (self.host, self.port) != ("127.0.0.1", port)):
            sock.close()
            return None
        return sock

    def close(self) -> None:
        """Close the connection, if any."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
