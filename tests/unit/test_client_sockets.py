"""The host-side listeners clients connect to: 127.0.0.1 ports and 0600 unix sockets, non-blocking,
and closed again when they cannot be bound."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from sandbox_kernels.client_sockets import listen_local, listen_unix
from sandbox_kernels.errors import SandboxConnectionError


def test_a_local_port_listens_on_loopback_only_without_blocking() -> None:
    sock = listen_local(0)
    try:
        host, port = sock.getsockname()
        assert host == "127.0.0.1" and port > 0 and not sock.getblocking()
        with pytest.raises(SandboxConnectionError, match=f"cannot listen on 127.0.0.1:{port}"):
            listen_local(port)  # taken (a listener: SO_REUSEADDR does not share it)
    finally:
        sock.close()


def test_a_unix_socket_is_0600_replaces_a_stale_name_and_names_itself_when_it_fails(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    path = state / "shell"
    path.write_text("stale")
    sock = listen_unix(path)
    try:
        mode = os.lstat(path).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600 and not sock.getblocking()
        assert sock.family == socket.AF_UNIX
    finally:
        sock.close()
    (state / "dir").mkdir()
    with pytest.raises(SandboxConnectionError, match="cannot listen on unix socket dir"):
        listen_unix(state / "dir")  # unlink of a directory fails
