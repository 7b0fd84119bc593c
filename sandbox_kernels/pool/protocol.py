"""The pool agent's wire format: one JSON object per line over a unix stream socket, with file
descriptors (a VM slot's lock) passed alongside a reply (``SCM_RIGHTS``).

Both ends are processes of the same user (the socket is in a 0700 directory); reads are
bounded all the same, and every call has a timeout.
"""

from __future__ import annotations

import array
import json
import os
import socket
from typing import Any

from ..errors import SandboxConnectionError

#: The largest message either side accepts.
MAX_MESSAGE = 1 << 20
#: The most descriptors one message carries.
MAX_FDS = 4


def send(sock: socket.socket, message: dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> None:
    """Send ``message`` (and ``fds``, with its first bytes)."""
    data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
    if len(data) > MAX_MESSAGE:
        raise SandboxConnectionError(f"pool message too large ({len(data)} bytes)")
    sent = socket.send_fds(sock, [data], list(fds)) if fds else sock.send(data)
    if sent < len(data):
        sock.sendall(data[sent:])


def receive(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """Read one message and any descriptors that came with it.

    Raises:
        SandboxConnectionError: the peer closed the connection first, or sent too much or
            something that is not a JSON object.
    """
    buffer = b""
    fds: list[int] = []
    fd_size = array.array("i").itemsize
    while not buffer.endswith(b"\n"):
        data, ancillary, _flags, _addr = sock.recvmsg(65536, socket.CMSG_SPACE(MAX_FDS * fd_size))
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(payload[: len(payload) - len(payload) % fd_size])
                fds.extend(got)
        if not data:
            close_fds(fds)
            raise SandboxConnectionError("the pool agent closed the connection")
        buffer += data
        if len(buffer) > MAX_MESSAGE:
            close_fds(fds)
            raise SandboxConnectionError("pool message too large")
    try:
        message = json.loads(buffer)
    except ValueError as e:
        close_fds(fds)
        raise SandboxConnectionError(f"malformed pool message: {e}") from e
    if not isinstance(message, dict):
        close_fds(fds)
        raise SandboxConnectionError("malformed pool message: not an object")
    return message, fds


def close_fds(fds: list[int]) -> None:
    """Close descriptors received and not kept."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
