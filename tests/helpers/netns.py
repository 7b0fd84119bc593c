"""A network namespace with a veth link to the host, for tests of remote hosts.

The namespace and both link ends are created by the test and deleted afterwards; the
addresses (10.231.N.0/30) exist only on that link, so traffic never leaves this machine.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from dataclasses import dataclass
from typing import Iterator


@dataclass(frozen=True)
class NetNS:
    """A namespace and the addresses of its link: ``host_ip`` here, ``guest_ip`` inside."""

    name: str
    host_ip: str
    guest_ip: str


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@contextlib.contextmanager
def network_namespace(tag: str) -> Iterator[NetNS]:
    """Create ``sk-<tag>`` with a veth pair; remove it on exit, even after a failure."""
    n = os.getpid() % 250 + 1
    ns = NetNS(f"sk-{tag}", f"10.231.{n}.1", f"10.231.{n}.2")
    host_if, ns_if = f"skh{n}", f"skg{n}"
    subprocess.run(["ip", "netns", "del", ns.name], capture_output=True)
    subprocess.run(["ip", "link", "del", host_if], capture_output=True)
    try:
        _ip("netns", "add", ns.name)
        _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        _ip("link", "set", ns_if, "netns", ns.name)
        _ip("addr", "add", f"{ns.host_ip}/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("-n", ns.name, "addr", "add", f"{ns.guest_ip}/30", "dev", ns_if)
        _ip("-n", ns.name, "link", "set", ns_if, "up")
        _ip("-n", ns.name, "link", "set", "lo", "up")
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns.name], capture_output=True)
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
