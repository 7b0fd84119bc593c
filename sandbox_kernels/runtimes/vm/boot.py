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
import time
from pathlib import Path

from ...errors import SandboxStartError, SandboxTimeout
from .libvirt_conn import LibvirtHost

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


def wait_ready(host: LibvirtHost, name: str, serial_log: str | Path, timeout: float,
               poll: float = 0.1) -> float:
    """Wait for ``SANDBOX-READY`` on the console of domain ``name``.

    Returns:
        Seconds waited.

    Raises:
        SandboxStartError: the guest reported ``SANDBOX-FAILED`` or the VM stopped; the
            message holds the console tail.
        SandboxTimeout: no marker within ``timeout`` seconds (the VM is left running: the
            caller destroys it).
    """
    start = time.monotonic()
    path = Path(serial_log)
    offset = 0
    pending = b""
    checks = 0
    while True:
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < offset:  # rotated or truncated: start again from its beginning
                    offset = 0
                offset = max(offset, size - READ_LIMIT)  # skip what a flood wrote meanwhile
                f.seek(offset)
                chunk = f.read(READ_LIMIT)
        except FileNotFoundError:
            chunk = b""
        offset += len(chunk)
        pending = (pending + chunk)[-4096:]
        text = pending.decode(errors="replace")
        if READY_MARKER in text:
            return time.monotonic() - start
        if FAILED_MARKER in text:
            reason = text.split(FAILED_MARKER, 1)[1].splitlines()[0].strip()
            raise SandboxStartError(f"the guest of {name} failed to boot: {reason}. "
                                    f"Console:\n{console_tail(path)}")
        checks += 1
        if checks % 10 == 0:
            state = host.state(name)
            if state not in ("running", "paused"):
                raise SandboxStartError(
                    f"VM {name} stopped ({state}) before it was ready (kernel panic, wrong "
                    f"kernel/initrd, or a guest without sandbox-init?). Console:\n"
                    f"{console_tail(path)}")
        if time.monotonic() - start > timeout:
            raise SandboxTimeout(
                f"VM {name} did not print {READY_MARKER} within {timeout:g} s. Console:\n"
                f"{console_tail(path)}")
        time.sleep(poll)


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now (for the SSH forward)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
