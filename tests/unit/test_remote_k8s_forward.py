"""The Kubernetes port-forward as a Forwarder (runtimes/k8s/forward.py), with a fake stream
opener: repoint closes only the connections carried to the old pod port, pause drops them all,
and the listener (the client's local end) stays."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import pytest

from sandbox_kernels.errors import SandboxError, SandboxNotFound
from sandbox_kernels.runtimes.k8s.forward import PortForwarder


class Opener:
    """Opens "streams" that never answer: each records its pod port and waits to be released."""

    def __init__(self) -> None:
        self.ports: list[int] = []
        self.release = threading.Event()

    def __call__(self, port: int) -> Any:
        self.ports.append(port)
        self.release.wait(10)
        raise SandboxError("released")


def wait_for(check: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert check()


def closed_by_peer(sock: socket.socket) -> bool:
    sock.settimeout(5)
    try:
        return sock.recv(1) == b""
    except OSError:
        return True


def test_repoint_and_pause_keep_the_listener() -> None:
    opener = Opener()
    forwarder = PortForwarder(opener, "pod")
    try:
        local = forwarder.forward(0, 1000)
        first = socket.create_connection(("127.0.0.1", local))
        wait_for(lambda: opener.ports == [1000])
        forwarder.repoint(local, 2000)
        assert forwarder.forwards == {local: 2000}
        assert closed_by_peer(first)  # it was carried to the old kernel's port
        second = socket.create_connection(("127.0.0.1", local))  # same local end
        wait_for(lambda: opener.ports == [1000, 2000])
        forwarder.repoint(local, 2000)  # unchanged: nothing is dropped
        second.settimeout(0.3)
        with pytest.raises(socket.timeout):
            second.recv(1)
        forwarder.pause()
        assert closed_by_peer(second)
        with pytest.raises(SandboxNotFound):
            forwarder.repoint(local + 1, 1)
        first.close()
        second.close()
    finally:
        opener.release.set()
        forwarder.close()
