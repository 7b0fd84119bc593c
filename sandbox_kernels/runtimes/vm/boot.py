"""Waiting for a sandbox VM to boot: the serial console marker, and what to show when it fails.

The guest init prints ``SANDBOX-READY`` on the serial console once sshd listens, or
``SANDBOX-FAILED: <reason>`` before powering off. The console goes to a file
(``<serial type='file'>``) whose tail is put into every boot error. The guest writes that
file: it is only ever read from its end, a bounded number of bytes at a time (libvirt's
virtlogd, which writes it, rotates it at its ``max_size``).
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

READY_MARKER = "SANDBOX-READY"
FAILED_MARKER = "SANDBOX-FAILED:"
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1bc")
#: The most bytes of the console read at once (a tail, or one poll while waiting for boot).
READ_LIMIT = 64 * 1024


def read_tail(path: str | Path, limit: int = READ_LIMIT) -> str:
    """The last ``limit`` bytes of ``path``, decoded; empty if it cannot be read."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(max(0, size - limit))
            return f.read(limit).decode(errors="replace")
    except OSError:
        return ""


def console_tail(serial_log: str | Path, lines: int = 25) -> str:
    """The last ``lines`` lines of the serial console log (escape sequences removed)."""
    try:
        os.stat(serial_log)
    except OSError as e:
        return f"(no console log: {e.strerror or e})"
    text = read_tail(serial_log)
    shown = [_ANSI.sub("", line).rstrip() for line in text.splitlines()]
    shown = [line for line in shown if line]
    return "\n".join(shown[-lines:]) if shown else "(the console log is empty)"


class ConsoleWatch:
    """Follows a serial console log for the guest's markers, a bounded read at a time.

    Attributes:
        ready: ``SANDBOX-READY`` (or sshd's start) has been seen: try to log in.
        failed: the reason after ``SANDBOX-FAILED:``, once the guest printed it.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.ready = False
        self.failed: str | None = None
        self._offset = 0
        self._pending = b""

    def poll(self) -> bool:
        """Read what the guest wrote since the last call; returns :attr:`ready`."""
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < self._offset:  # rotated or truncated: start again from its beginning
                    self._offset = 0
                self._offset = max(self._offset, size - READ_LIMIT)  # skip what a flood wrote
                f.seek(self._offset)
                chunk = f.read(READ_LIMIT)
        except FileNotFoundError:
            chunk = b""
        self._offset += len(chunk)
        self._pending = (self._pending + chunk)[-4096:]
        text = self._pending.decode(errors="replace")
        if READY_MARKER in text or "sshd" in text:
            self.ready = True
        if FAILED_MARKER in text and self.failed is None:
            self.failed = text.split(FAILED_MARKER, 1)[1].splitlines()[0].strip() or "no reason given"
        return self.ready


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now (for the SSH forward)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
