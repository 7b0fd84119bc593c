"""One command's output from a pod exec websocket, read frame by frame and bounded.

The API server's exec stream (the channel protocol ``v4.channel.k8s.io``) carries stdin on
channel 0, stdout on 1, stderr on 2 and the command's final status on 3. Everything on it
comes from the pod, whose code is hostile, so nothing is kept without a bound: stdout and
stderr together stop at ``limit`` bytes (a :class:`SandboxError`, and the stream is closed,
which ends the command with a broken pipe), and the status is parsed only up to a small size,
its exit code only as a short number. The kubernetes client's own ``WSClient`` is not used:
it keeps a second copy of all output and reads every frame already waiting in one go, so a
flood would grow without bound before any check could run.

All functions block; call them through ``to_thread``.
"""

from __future__ import annotations

import json
import re
import select
import ssl
import time
from typing import Any, NamedTuple

from ...errors import SandboxError, SandboxTimeout

#: As over SSH (:mod:`sandbox_kernels.ssh.tunnel_commands`): no command of ours prints more.
MAX_OUTPUT = 64 << 20
PROTOCOL = "v4.channel.k8s.io"
_STDIN, _STDOUT, _STDERR, _STATUS = 0, 1, 2, 3
_MAX_STATUS = 64 << 10
_EXIT_CODE = re.compile(r"[0-9]{1,9}")
_POLL = 0.5


class ExecResult(NamedTuple):
    """What an exec returns; unpacks as ``exit_code, stdout, stderr``."""

    exit_code: int
    stdout: bytes
    stderr: bytes


def collect(ws: Any, stdin: bytes | None, timeout: float, what: str,
            limit: int = MAX_OUTPUT) -> ExecResult:
    """Send ``stdin``, then read the command's output and status until the stream ends.

    Args:
        ws: a connected exec websocket (``websocket.WebSocket``) speaking :data:`PROTOCOL`.
        stdin: bytes for the command's stdin (sent in one frame), or None.
        timeout: seconds for the whole command.
        what: the command, for messages.
        limit: the most bytes of stdout and stderr together.

    Raises:
        SandboxTimeout: the stream did not end within ``timeout``.
        SandboxError: more output than ``limit``, or a status that is too large or malformed.
    """
    from websocket import ABNF

    deadline = time.monotonic() + timeout
    out, err, status = bytearray(), bytearray(), bytearray()
    if stdin:
        ws.send_binary(bytes((_STDIN,)) + stdin)
    raw = ws.sock
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise SandboxTimeout(f"{what}: no result within {timeout:g} s")
        if not (isinstance(raw, ssl.SSLSocket) and raw.pending()):
            readable, _, _ = select.select([raw], [], [], min(remaining, _POLL))
            if not readable:
                continue
        opcode, frame = ws.recv_data_frame(True)
        if opcode == ABNF.OPCODE_CLOSE:
            break
        if opcode not in (ABNF.OPCODE_BINARY, ABNF.OPCODE_TEXT) or not frame.data:
            continue
        channel, payload = frame.data[0], frame.data[1:]
        if channel == _STDOUT:
            out += payload
        elif channel == _STDERR:
            err += payload
        elif channel == _STATUS:
            status += payload
            if len(status) > _MAX_STATUS:
                raise SandboxError(f"{what}: the exec status passed {_MAX_STATUS} bytes; the stream "
                                   "is not the API server's")
        if len(out) + len(err) > limit:
            raise SandboxError(
                f"{what}: the command's output passed {limit >> 20} MiB, the most read from a "
                "pod; the command was cut off (something in the pod floods its output, or "
                "planted a huge file where the provisioner reads)")
    return ExecResult(exit_code(bytes(status), what), bytes(out), bytes(err))


def exit_code(raw: bytes, what: str) -> int:
    """The command's exit code from the status channel (-1 if none came).

    Raises:
        SandboxError: the exec itself failed, or the status is malformed.
    """
    if not raw:
        return -1
    try:
        status = json.loads(raw)
    except ValueError as e:
        raise SandboxError(f"{what}: unreadable exec status") from e
    if not isinstance(status, dict):
        raise SandboxError(f"{what}: unreadable exec status")
    if status.get("status") == "Success":
        return 0
    details = status.get("details")
    causes = details.get("causes") if isinstance(details, dict) else None
    for cause in causes if isinstance(causes, list) else []:
        if isinstance(cause, dict) and cause.get("reason") == "ExitCode":
            code = str(cause.get("message", ""))
            if not _EXIT_CODE.fullmatch(code):
                raise SandboxError(f"{what}: exit code {code[:20]!r} is not a number")
            return int(code)
    raise SandboxError(f"{what}: exec failed: {str(status.get('message', ''))[:500]}")
