"""A connection dialed ahead of a login (a warm-pool VM's sshd): kept open and fresh, handed
over once, and never to another port than the one asked for."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from sandbox_kernels.ssh.dialed import DialedAhead, still_open


@pytest.fixture
def server() -> Iterator[socket.socket]:
    """A listener on 127.0.0.1 that a test accepts from (the banner is the test's to send)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.settimeout(10)
        yield listener


def test_refresh_dials_once_then_keeps_the_open_connection(server: socket.socket) -> None:
    ahead = DialedAhead(*server.getsockname())
    ahead.refresh()
    peer, _ = server.accept()
    with peer:
        peer.sendall(b"SSH-2.0-test\r\n")
        ahead.refresh()  # young and open: kept
        server.settimeout(0)
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing dialed again
        sock = ahead.take()
        assert sock is not None and ahead.take() is None, "handed over twice"
        with sock:
            assert sock.recv(64) == b"SSH-2.0-test\r\n", "the banner waiting in it was lost"


def test_a_connection_the_server_closed_or_an_old_one_is_dialed_again(server: socket.socket) -> None:
    ahead = DialedAhead(*server.getsockname())
    ahead.refresh()
    first, _ = server.accept()
    first.close()  # LoginGraceTime passed
    ahead.refresh()
    second, _ = server.accept()
    with second:
        ahead.max_age = 0.0  # every connection is too old now
        ahead.refresh()
        third, _ = server.accept()
        with third:
            sock = ahead.take()
            assert sock is not None and sock.getsockname() == third.getpeername()
            sock.close()


def test_take_refuses_a_closed_connection_or_another_port(server: socket.socket) -> None:
    host, port = server.getsockname()
    ahead = DialedAhead(host, port)
    ahead.refresh()
    peer, _ = server.accept()
    peer.close()
    assert ahead.take() is None, "a closed connection was handed over"
    ahead.refresh()
    with server.accept()[0]:
        assert ahead.take(port + 1) is None, "a connection to another port was handed over"
        ahead.refresh()
        with server.accept()[0]:
            sock = ahead.take(port)
            assert sock is not None
            received = DialedAhead.received(sock)
            assert (received.host, received.port) == (host, port) and still_open(sock)
            assert received.take(port) is sock
            sock.close()
