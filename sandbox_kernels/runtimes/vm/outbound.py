"""Outbound network for VMs with ``allow_network``: a NIC of its own that cannot reach this machine.

The SSH path stays QEMU's slirp NIC with ``restrict=on`` (only the forward on 127.0.0.1 gets
through). With ``allow_network`` the guest gets a second virtio NIC (MAC :data:`GUEST_MAC`),
wired to a ``passt`` process of ours that turns the guest's packets into sockets on the host:

* passt runs as the dedicated unprivileged user :data:`NET_USER`, with its gateway mapping
  off (``--no-map-gw``: the gateway address is not the host's loopback), IPv4 only, and no
  inbound ports;
* the nftables table ``inet`` :data:`TABLE` rejects every packet that user's sockets send to an
  address of this machine (``fib daddr type`` local, broadcast, multicast, anycast): the host's
  loopback (the Jupyter server, other kernels' forwards) and its other addresses, whatever
  guest root does inside the guest. DNS to a loopback resolver of the host's resolv.conf is
  the one exception (port 53 of that address), as slirp's resolver was before.

Wiring: we listen on a unix socket in the kernel's private state directory; QEMU connects to
it when it starts (``-netdev stream,server=off``); we hand the accepted connection to passt
(``-F``) and remove the socket. passt exits when QEMU closes that connection (destroy, crash,
``reap``), so it never outlives its VM; :func:`leftover_processes` finds any that did.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import pwd
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from ...errors import SandboxStartError, SandboxUnavailable

NET_USER = "sandbox-kernels-net"
TABLE = "sandbox_kernels_net"
#: The outbound NIC as the guest sees it (sandbox-init finds it by this MAC).
GUEST_MAC = "52:54:00:5a:4b:01"
GUEST_ADDR, GATEWAY, DNS = "10.0.3.15", "10.0.3.2", "10.0.3.3"
#: argv[0] of our passt processes, then the kernel id in hex (passt picks its mode from
#: argv[0]: it must say "passt" and never "pasta", which hex cannot spell).
ARGV0 = "passt:sandbox-kernels:"
ACCEPT_TIMEOUT = 60.0
LOG_SIZE = 1 << 20
T = TypeVar("T")


def net_uid() -> int:
    """The uid passt runs as.

    Raises:
        SandboxUnavailable: the user does not exist (scripts/setup.sh creates it).
    """
    try:
        return pwd.getpwnam(NET_USER).pw_uid
    except KeyError:
        raise SandboxUnavailable(
            f"allow_network needs the system user {NET_USER!r} for passt: `useradd --system "
            f"--no-create-home --shell /usr/sbin/nologin {NET_USER}` (scripts/setup.sh does), "
            "or turn allow_network off.") from None


def ruleset(uid: int, resolv_conf: str = "/etc/resolv.conf") -> str:
    """The nftables script that (re)creates :data:`TABLE` for passt's ``uid`` (atomically)."""
    accepts = []
    for server in _loopback_nameservers(resolv_conf):
        family = "ip" if server.version == 4 else "ip6"
        accepts.append(f"    meta skuid {uid} {family} daddr {server} meta l4proto {{ tcp, udp }} "
                       "th dport 53 accept")
    return "\n".join([
        f"table inet {TABLE}",
        f"delete table inet {TABLE}",
        f"table inet {TABLE} {{",
        "  chain output {",
        "    type filter hook output priority filter; policy accept;",
        *accepts,
        f"    meta skuid {uid} fib daddr type {{ local, broadcast, multicast, anycast }} counter reject",
        "  }",
        "}",
    ]) + "\n"


def ensure_firewall(uid: int) -> None:
    """Install (or renew) the table that keeps passt's user off this machine's addresses.

    Raises:
        SandboxUnavailable: not root, or nft is missing or refused the table.
    """
    if os.geteuid() != 0:
        raise SandboxUnavailable(
            "allow_network needs the Jupyter server to run as root: it starts passt as "
            f"{NET_USER} behind an nftables rule that keeps the guest off this machine. Run "
            "the server as root or turn allow_network off.")
    nft = shutil.which("nft")
    if nft is None:
        raise SandboxUnavailable("allow_network needs nftables: `apt-get install nftables` "
                                 "(scripts/setup.sh does), or turn allow_network off.")
    proc = subprocess.run([nft, "-f", "-"], input=ruleset(uid), capture_output=True, text=True,
                          timeout=30)
    if proc.returncode != 0:
        raise SandboxUnavailable(f"nft refused the table inet {TABLE} that keeps VMs with "
                                 f"allow_network off this machine: {proc.stderr.strip()[:500]}")


def problem() -> str | None:
    """Why VMs with allow_network cannot start here (for ``doctor``), or None if they can."""
    if shutil.which("passt") is None:
        return "passt is missing: apt-get install passt (scripts/setup.sh does)"
    if shutil.which("nft") is None:
        return "nft is missing: apt-get install nftables (scripts/setup.sh does)"
    try:
        net_uid()
    except SandboxUnavailable as e:
        return str(e)
    if os.geteuid() != 0:
        return "the server must run as root to start passt as its own user behind the nftables rule"
    return None


class OutboundLink:
    """One VM's outbound NIC: the socket QEMU connects to, and the passt serving it.

    Each QEMU start (boot, golden restore, a disk rollback's new QEMU) goes through
    :meth:`start_with`; :meth:`close` ends it (idempotent).
    """

    def __init__(self, socket_path: Path, kernel_id: str, emulator_uid: int) -> None:
        self.socket_path = Path(socket_path)
        self.kernel_id = kernel_id
        self.emulator_uid = emulator_uid
        #: passt's own log (it opens it before dropping privileges and caps it at LOG_SIZE).
        self.log_path = self.socket_path.with_name("passt.log")
        self._listener: socket.socket | None = None
        self._passt: subprocess.Popen[bytes] | None = None

    def listen(self) -> None:
        """Check the prerequisites, install the firewall, and open the socket for QEMU.

        Raises:
            SandboxUnavailable: passt, its user or the firewall is missing.
        """
        self.close()
        if shutil.which("passt") is None:
            raise SandboxUnavailable("allow_network needs passt: `apt-get install passt` "
                                     "(scripts/setup.sh does), or turn allow_network off.")
        ensure_firewall(net_uid())
        self.socket_path.unlink(missing_ok=True)  # our private state directory: no one else's
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(self.socket_path))
            os.chmod(self.socket_path, 0o600, follow_symlinks=False)
            os.chown(self.socket_path, self.emulator_uid, -1, follow_symlinks=False)
            listener.listen(1)
        except OSError:
            listener.close()
            raise
        self._listener = listener

    def serve(self, timeout: float = ACCEPT_TIMEOUT) -> None:
        """Accept QEMU's connection, start passt on it, remove the socket.

        Raises:
            SandboxStartError: QEMU did not connect in time, or passt would not start.
        """
        listener = self._listener
        if listener is None:
            raise SandboxStartError("the outbound link was not listening (call listen() first)")
        listener.settimeout(timeout)
        try:
            conn, _ = listener.accept()
        except OSError as e:
            raise SandboxStartError(f"QEMU did not connect its outbound NIC to {self.socket_path} "
                                    f"within {timeout:g} s: {e}") from e
        finally:
            self._close_listener()
        with conn:
            argv = [ARGV0 + self.kernel_id.encode().hex(), "-f", "-q", "--runas", NET_USER,
                    "-F", str(conn.fileno()), "-l", str(self.log_path), "--log-size", str(LOG_SIZE),
                    "--no-map-gw", "-4", "-t", "none", "-u", "none", "-a", GUEST_ADDR, "-n", "24",
                    "-g", GATEWAY, "--dns-forward", DNS, "--no-dhcpv6", "--no-ndp", "--no-ra"]
            try:
                self._passt = subprocess.Popen(argv, executable=shutil.which("passt"),
                                               pass_fds=[conn.fileno()], stdin=subprocess.DEVNULL,
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            except OSError as e:
                raise SandboxStartError(f"passt did not start: {e}") from e
        try:
            code = self._passt.wait(0.2)
        except subprocess.TimeoutExpired:
            return
        raise SandboxStartError(f"passt exited at once (code {code}); its log {self.log_path}:\n"
                                f"{_tail(self.log_path)}")

    def start_with(self, start: Callable[[], T], timeout: float = ACCEPT_TIMEOUT) -> T:
        """Listen, run ``start`` (which starts QEMU), serve; close everything if any step fails."""
        self.listen()
        try:
            result = start()
            self.serve(timeout)
        except BaseException:
            self.close()
            raise
        return result

    @property
    def pid(self) -> int | None:
        """passt's pid while it runs."""
        return self._passt.pid if self._passt is not None and self._passt.poll() is None else None

    def close(self) -> None:
        """Stop passt (it normally exits with QEMU) and remove the socket."""
        self._close_listener()
        proc, self._passt = self._passt, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)

    def _close_listener(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            self.socket_path.unlink(missing_ok=True)


def leftover_processes() -> Iterator[tuple[int, str]]:
    """``(pid, kernel id)`` of every passt of ours running (for ``reap`` and the leak check)."""
    try:
        uid = pwd.getpwnam(NET_USER).pw_uid
    except KeyError:
        return
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv0 = (entry / "cmdline").read_bytes()[:512].split(b"\0", 1)[0].decode()
            if not argv0.startswith(ARGV0) or entry.stat().st_uid != uid:
                continue
            kernel_id = bytes.fromhex(argv0[len(ARGV0):]).decode()
        except (OSError, ValueError):
            continue
        yield int(entry.name), kernel_id


def stop_process(pid: int, kernel_id: str) -> None:
    """Kill the passt ``pid`` of ``kernel_id`` if it is still that process (not a reused pid)."""
    if (pid, kernel_id) in set(leftover_processes()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - limit))
            return f.read(limit).decode(errors="replace").strip()
    except OSError as e:
        return f"(unreadable: {e.strerror or e})"


def _loopback_nameservers(resolv_conf: str) -> Iterator[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        with open(resolv_conf, "rb") as f:
            text = f.read(65536).decode(errors="replace")
    except OSError:
        return
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            try:
                address = ipaddress.ip_address(words[1].split("%")[0])
            except ValueError:
                continue
            if address.is_loopback:
                yield address
