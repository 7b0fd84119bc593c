"""SSHTunnel against a real OpenSSH server: forwards, pinning, reconnects, remote commands.

Everything here is real: sshd from tests/helpers/sshd.py on 127.0.0.1, TCP servers started by
the tests, pyzmq sockets. The "remote" side is this machine, so tests can check files and
processes directly.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import signal
import socket
import socketserver
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import paramiko
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from helpers.sshd import SSHD, SSHServer, running_sshd
from sandbox_kernels.errors import (
    HostKeyMismatch,
    SandboxConfigError,
    SandboxConnectionError,
    SandboxError,
    SandboxNotFound,
    SandboxTimeout,
)
from sandbox_kernels.ssh import SSHTunnel, create_sandbox_keys, generate_keypair, load_private_key

pytestmark = [
    pytest.mark.ssh,
    pytest.mark.skipif(not os.path.exists(SSHD), reason="needs OpenSSH's sshd"),
]

LOG = logging.getLogger("tests.ssh")
MB = 1 << 20


# ---------------------------------------------------------------- local test servers


class _Handler(socketserver.BaseRequestHandler):
    """First line picks the mode: ``echo``, ``count`` (reply after EOF) or ``send N``."""

    def handle(self) -> None:
        sock: socket.socket = self.request
        command = _read_line(sock)
        if command == b"echo":
            while data := sock.recv(1 << 18):
                sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        elif command == b"count":
            digest, total = hashlib.sha256(), 0
            while data := sock.recv(1 << 20):
                digest.update(data)
                total += len(data)
            sock.sendall(f"{total} {digest.hexdigest()}".encode())
        elif command.startswith(b"send "):
            _send_pattern(sock, int(command.split()[1]))


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture
def server_port() -> Iterator[int]:
    """A threaded TCP server on 127.0.0.1 (the forward target); see ``_Handler``."""
    server = _Server(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, name="test-tcp-server", daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _read_line(sock: socket.socket) -> bytes:
    line = bytearray()
    while not line.endswith(b"\n"):
        byte = sock.recv(1)
        if not byte:
            break
        line += byte
    return bytes(line).strip()


def _pattern(size: int) -> bytes:
    block = hashlib.sha256(b"pattern").digest() * (MB // 32)
    return (block * (size // len(block) + 1))[:size]


def _send_pattern(sock: socket.socket, size: int) -> None:
    block = _pattern(MB)
    while size > 0:
        sock.sendall(block[: min(size, MB)])
        size -= MB


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[SSHServer]:
    with running_sshd(tmp_path / "sshd") as server:
        yield server


def _tunnel(server: SSHServer, **kwargs: object) -> SSHTunnel:
    options: dict[str, object] = {"logger": LOG, "connect_timeout": 5.0}
    options.update(kwargs)
    return SSHTunnel(
        server.host,
        server.port,
        server.user,
        server.client_key.paramiko_key,
        server.host_public_line,
        **options,
    )


@pytest.fixture
def tunnel(sshd: SSHServer) -> Iterator[SSHTunnel]:
    tun = _tunnel(sshd)
    try:
        tun.ensure_connected(10)
        yield tun
    finally:
        tun.close()


def _connect(port: int, timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.settimeout(timeout)
    return sock


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(min(size - len(data), MB))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def _recv_to_eof(sock: socket.socket) -> bytes:
    data = bytearray()
    while chunk := sock.recv(MB):
        data += chunk
    return bytes(data)


def _echo_once(port: int, payload: bytes = b"ping") -> bytes:
    with _connect(port) as sock:
        sock.sendall(b"echo\n" + payload)
        return _recv_exactly(sock, len(payload))


def _wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _drop_connection(tun: SSHTunnel) -> None:
    """Cut the tunnel's TCP connection under it, as a network failure would."""
    transport = tun._transport
    assert transport is not None
    transport.sock.shutdown(socket.SHUT_RDWR)
    _wait_until(lambda: not transport.is_active(), 5, "the transport to notice the drop")


def _listening(port: int) -> list[str]:
    """Local addresses in LISTEN state on ``port``, read from /proc/net/tcp{,6}."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                address, port_hex = fields[1].rsplit(":", 1)
                if int(port_hex, 16) == port and fields[3] == "0A":
                    found.append(address)
    return found


def _tunnel_threads(tun: SSHTunnel) -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(tun.thread_name)]


def _sshd_connections(server: SSHServer) -> int:
    return server.log().count("Connection from 127.0.0.1")


# ---------------------------------------------------------------- keys


def test_sandbox_keys_are_private_and_usable(tmp_path: Path) -> None:
    keys = create_sandbox_keys(tmp_path / "keys", "sbx-1")
    assert stat.S_IMODE(keys.directory.stat().st_mode) == 0o700
    for path in keys.directory.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert keys.client.public_line.startswith("ssh-ed25519 AAAA")
    assert "PRIVATE" not in repr(keys)
    loaded = load_private_key(keys.client_key_path)
    assert loaded.fingerprint == keys.client.fingerprint
    with pytest.raises(SandboxConfigError, match="sandbox id"):
        create_sandbox_keys(tmp_path / "keys", "../escape")


def test_load_private_key_refuses_open_or_bad_files(tmp_path: Path) -> None:
    keys = create_sandbox_keys(tmp_path / "keys", "sbx")
    keys.client_key_path.chmod(0o644)
    with pytest.raises(SandboxConfigError, match=str(keys.client_key_path)) as info:
        load_private_key(keys.client_key_path)
    assert "chmod 600" in str(info.value)
    garbage = tmp_path / "garbage"
    garbage.write_text("not a key")
    garbage.chmod(0o600)
    with pytest.raises(SandboxConfigError, match=str(garbage)):
        load_private_key(garbage)
    with pytest.raises(SandboxConfigError, match="missing"):
        load_private_key(tmp_path / "missing")


@pytest.mark.parametrize("kind", ["rsa", "ecdsa"])
def test_load_private_key_reads_rsa_and_ecdsa(tmp_path: Path, kind: str) -> None:
    private = rsa.generate_private_key(65537, 2048) if kind == "rsa" else ec.generate_private_key(
        ec.SECP256R1()
    )
    text = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    path = tmp_path / kind
    path.write_bytes(text)
    path.chmod(0o600)
    assert load_private_key(path).can_sign()


@pytest.mark.skipif(not shutil.which("ssh-keygen"), reason="needs ssh-keygen")
def test_fingerprints_match_openssh(tmp_path: Path) -> None:
    keys = create_sandbox_keys(tmp_path / "keys", "sbx")
    out = subprocess.run(
        ["ssh-keygen", "-l", "-f", str(keys.host_key_path) + ".pub"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert keys.host.fingerprint in out


# ---------------------------------------------------------------- forwarding


def test_forward_round_trip_on_loopback_only(tunnel: SSHTunnel, server_port: int) -> None:
    port = tunnel.forward(0, server_port)
    assert _listening(port) == ["0100007F"]  # 127.0.0.1, nothing on 0.0.0.0 or ::
    assert _echo_once(port, b"hello through ssh") == b"hello through ssh"
    assert tunnel.forwards == {port: ("127.0.0.1", server_port)}


def test_forward_on_a_chosen_port(tunnel: SSHTunnel, server_port: int) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        wanted = probe.getsockname()[1]
    assert tunnel.forward(wanted, server_port) == wanted
    assert _echo_once(wanted) == b"ping"
    with pytest.raises(SandboxConnectionError, match=str(wanted)):
        tunnel.forward(wanted, server_port)


def test_many_concurrent_connections(tunnel: SSHTunnel, server_port: int) -> None:
    port = tunnel.forward(0, server_port)

    def exchange(i: int) -> bool:
        payload = hashlib.sha256(str(i).encode()).digest() * 8192  # 256 KiB each
        with _connect(port) as sock:
            sock.sendall(b"echo\n" + payload)
            sock.shutdown(socket.SHUT_WR)
            return _recv_to_eof(sock) == payload

    with ThreadPoolExecutor(50) as pool:
        assert all(pool.map(exchange, range(50)))
    assert _echo_once(port) == b"ping"


def test_throughput_100_mb(tunnel: SSHTunnel, server_port: int) -> None:
    port = tunnel.forward(0, server_port)
    size, block = 100 * MB, _pattern(MB)
    with _connect(port, timeout=60) as sock:
        start = time.perf_counter()
        sock.sendall(b"count\n")
        for _ in range(size // MB):
            sock.sendall(block)
        sock.shutdown(socket.SHUT_WR)
        reply = _recv_to_eof(sock).decode()
        upload = time.perf_counter() - start
    assert reply == f"{size} {hashlib.sha256(block * (size // MB)).hexdigest()}"
    with _connect(port, timeout=60) as sock:
        start = time.perf_counter()
        sock.sendall(f"send {size}\n".encode())
        received = _recv_to_eof(sock)
        download = time.perf_counter() - start
    assert received == block * (size // MB)
    print(f"\n100 MB through one forward: upload {size / MB / upload:.0f} MB/s, "
          f"download {size / MB / download:.0f} MB/s")


def test_half_close_still_gets_the_reply(tunnel: SSHTunnel, server_port: int) -> None:
    port = tunnel.forward(0, server_port)
    with _connect(port) as sock:
        sock.sendall(b"count\n" + b"x" * 1000)
        sock.shutdown(socket.SHUT_WR)  # local EOF: passed on as SSH EOF, reply still flows
        assert _recv_to_eof(sock).decode().startswith("1000 ")


def test_remote_close_delivers_everything_then_eof(tunnel: SSHTunnel, server_port: int) -> None:
    port = tunnel.forward(0, server_port)
    with _connect(port) as sock:
        sock.sendall(b"send 5000000\n")
        assert _recv_to_eof(sock) == _pattern(5 * MB)[:5000000]
    _wait_until(lambda: tunnel._forwards.pump.pair_count == 0, 5, "the pair to be closed")


def test_refused_remote_port_closes_the_local_connection(tunnel: SSHTunnel) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    port = tunnel.forward(0, dead_port)
    with _connect(port) as sock:
        assert sock.recv(10) == b""
    assert tunnel.is_alive


def test_a_slow_channel_open_holds_up_no_other_connection(sshd: SSHServer, server_port: int) -> None:
    """Opening a channel is a round trip into the sandbox (sshd connects to the port there),
    and a kernel client connects five at once: one slow open must not stall the others, or
    the bytes of connections already open. Here sshd's connect hangs: the destination's
    accept queue is full (Linux drops the SYNs), and the open's timeout is a minute."""
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    filler = socket.create_connection(full.getsockname(), timeout=10)  # the queue holds one
    tun = _tunnel(sshd, connect_timeout=60.0)
    try:
        tun.ensure_connected(10)
        slow_port = tun.forward(0, full.getsockname()[1])
        fast_port = tun.forward(0, server_port)
        with _connect(fast_port) as open_before:
            open_before.sendall(b"echo\nfirst")
            assert _recv_exactly(open_before, 5) == b"first"
            with _connect(slow_port) as waiting:  # its channel's open hangs in sshd's connect
                assert _echo_once(fast_port, b"new") == b"new", "a new connection waited for the slow open"
                open_before.sendall(b"again")
                assert _recv_exactly(open_before, 5) == b"again", "an open connection stalled"
                waiting.settimeout(0)
                with pytest.raises(BlockingIOError):
                    waiting.recv(1)  # still waiting for its channel, neither closed nor served
    finally:
        tun.close()  # ends the pending open with the connection
        full.close()
        filler.close()
    assert _tunnel_threads(tun) == [], "a channel opener outlived the tunnel"


def _connecting_to(port: int) -> bool:
    """Whether a TCP connection to 127.0.0.1:``port`` is in SYN_SENT (from /proc/net/tcp)."""
    with open("/proc/net/tcp") as f:
        return any(int(line.split()[2].rsplit(":", 1)[1], 16) == port and line.split()[3] == "02"
                   for line in f.readlines()[1:])


def test_a_channel_that_opens_after_its_forward_paused_is_dropped(sshd: SSHServer) -> None:
    """Channels open in their own threads: one whose forward was paused (a kernel restarting)
    while it opened must not carry its bytes to the old destination."""
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    full.settimeout(60)  # sshd's SYN gets in at its next retransmission (seconds)
    old_port = full.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", old_port), timeout=10)
    tun = _tunnel(sshd, connect_timeout=60.0)
    try:
        tun.ensure_connected(10)
        port = tun.forward(0, old_port)
        with _connect(port, timeout=30) as waiting:
            waiting.sendall(b"for the old kernel")
            _wait_until(lambda: _connecting_to(old_port), 10, "sshd to connect to the old port")
            tun.pause_forward(port)
            full.accept()[0].close()  # the filler: room for sshd's connection, which now opens
            late, _ = full.accept()
            with late:
                late.settimeout(30)
                with contextlib.suppress(ConnectionResetError):  # closed with bytes unread: a reset
                    assert _recv_to_eof(waiting) == b"", "the connection was served, not closed"
                assert _recv_to_eof(late) == b"", "bytes reached the paused forward's old port"
    finally:
        tun.close()
        full.close()
        filler.close()


def test_paused_forward_holds_connections_until_repointed(tunnel: SSHTunnel, server_port: int) -> None:
    """A kernel restarting: its port's clients wait (not refused, not sent to a dead port)
    and reach the new destination the moment the forward is repointed."""
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()  # nothing listens there: the old kernel's port
    port = tunnel.forward(0, dead_port)
    with _connect(port) as refused:
        assert _recv_to_eof(refused) == b"", "a dead destination closes the connection"
    tunnel.pause_forward(port)
    held = _connect(port)  # completes in the listening socket's backlog
    try:
        held.sendall(b"echo\nheld")
        held.settimeout(0.5)
        with pytest.raises(socket.timeout):
            held.recv(10)
        tunnel.repoint_forward(port, server_port)
        held.settimeout(10)
        assert _recv_exactly(held, 4) == b"held"
    finally:
        held.close()
    assert tunnel.forwards == {port: ("127.0.0.1", server_port)}
    with _connect(port) as open_pair:
        open_pair.sendall(b"echo\nx")
        assert _recv_exactly(open_pair, 1) == b"x"
        tunnel.pause_forward(port)
        assert _recv_to_eof(open_pair) == b"", "pausing closes the open connections"
    tunnel.repoint_forward(port, server_port)
    assert _echo_once(port) == b"ping"


def test_close_forward_frees_the_port(tunnel: SSHTunnel, server_port: int) -> None:
    port = tunnel.forward(0, server_port)
    tunnel.close_forward(port)
    assert _listening(port) == []
    with pytest.raises(SandboxNotFound):
        tunnel.close_forward(port)


def test_forward_on_a_unix_socket(tunnel: SSHTunnel, server_port: int, tmp_path: Path) -> None:
    """A forward can listen on a 0600 unix socket (ipc clients), named by a small number;
    pausing and repointing keep the same socket."""
    from sandbox_kernels.client_sockets import listen_unix

    path = tmp_path / "k-3"
    assert tunnel.forward(3, server_port, sock=listen_unix(path)) == 3
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    assert tunnel.forwards == {3: ("127.0.0.1", server_port)}

    def echo() -> bytes:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(path))
            sock.sendall(b"echo\nunix")
            return _recv_exactly(sock, 4)

    assert echo() == b"unix"
    tunnel.pause_forward(3)
    tunnel.repoint_forward(3, server_port)
    assert echo() == b"unix"
    tunnel.close_forward(3)
    with socket.socket(socket.AF_UNIX) as sock, pytest.raises(ConnectionRefusedError):
        sock.connect(str(path))


def test_forward_refuses_a_reserved_socket_elsewhere(tunnel: SSHTunnel, server_port: int) -> None:
    other = socket.socket()
    other.bind(("127.0.0.1", 0))
    try:
        with pytest.raises(SandboxConfigError, match="reserved socket"):
            tunnel.forward(other.getsockname()[1] + 1, server_port, sock=other)
    finally:
        other.close()


def test_client_sockets_survive_jupyter_clients_ipc_cleanup(tmp_path: Path) -> None:
    """jupyter_client removes ``<ip>-<port>`` on every restart; the listeners stay and
    relink() gives their names back, so clients reconnect to the same sockets. Release
    removes every name."""
    from types import SimpleNamespace

    from sandbox_kernels.client_sockets import ClientSockets

    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    sockets = ClientSockets("ipc", state)
    km = SimpleNamespace()
    sockets.assign(km, {})
    ports = [km.shell_port, km.iopub_port, km.stdin_port, km.control_port, km.hb_port]
    assert km.transport == "ipc" and km.ip == str(state / "k") and sorted(ports) == [1, 2, 3, 4, 5]
    listener = sockets.claim(km.iopub_port)
    public = Path(f"{km.ip}-{km.iopub_port}")
    assert stat.S_ISSOCK(os.lstat(public).st_mode) and stat.S_IMODE(os.lstat(public).st_mode) == 0o600
    public.unlink()  # KernelManager.cleanup_ipc_files()
    sockets.assign(km, {"shell_port": 1})  # the restart's pre_launch
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(str(public))
        conn, _ = listener.accept()
        conn.close()
    listener.close()
    sockets.release()
    assert list(state.iterdir()) == []


def test_client_sockets_replace_planted_names_without_following_them(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from sandbox_kernels.client_sockets import ClientSockets

    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    target = tmp_path / "target"
    target.write_text("keep")
    for name in ("k-2", "listen-3"):
        (state / name).symlink_to(target)
    sockets = ClientSockets("ipc", state)
    sockets.assign(SimpleNamespace(), {})
    for name in ("k-2", "listen-3"):
        assert stat.S_ISSOCK(os.lstat(state / name).st_mode), name
    assert target.read_text() == "keep" and stat.S_ISREG(os.lstat(target).st_mode)
    sockets.release()
    assert list(state.iterdir()) == []


def test_client_sockets_refuse_a_shared_directory(tmp_path: Path) -> None:
    from sandbox_kernels.client_sockets import ClientSockets

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)  # whatever the umask
    with pytest.raises(SandboxConfigError, match="mode 0700"):
        ClientSockets("ipc", shared).assign(type("KM", (), {})(), {})
    link = tmp_path / "link"
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    link.symlink_to(private)
    with pytest.raises(SandboxConfigError, match="must be a directory"):
        ClientSockets("ipc", link).assign(type("KM", (), {})(), {})


# ---------------------------------------------------------------- host keys and handshake


def test_host_key_mismatch_is_refused_before_login(tmp_path: Path) -> None:
    pinned = generate_keypair("pinned")
    with running_sshd(tmp_path / "sshd") as server:
        before = _sshd_connections(server)
        tun = SSHTunnel(
            server.host, server.port, server.user, server.client_key.paramiko_key,
            pinned.public_line, logger=LOG,
        )
        try:
            with pytest.raises(HostKeyMismatch) as info:
                tun.ensure_connected(30)
        finally:
            tun.close()
        message = str(info.value)
        assert f"{server.host}:{server.port}" in message
        assert pinned.fingerprint in message
        assert server.host_key.fingerprint in message
        assert _sshd_connections(server) == before + 1  # not retried
        assert "Accepted publickey" not in server.log()


def test_pin_from_known_hosts(tmp_path: Path, sshd: SSHServer, server_port: int) -> None:
    known_hosts = tmp_path / "known_hosts"
    hashed = paramiko.HostKeys.hash_host(f"[sandbox-7]:{sshd.port}")
    known_hosts.write_text(f"{hashed} {sshd.host_public_line}\n")
    with SSHTunnel(
        sshd.host, sshd.port, sshd.user, sshd.client_key.paramiko_key,
        known_hosts=known_hosts, host_alias="sandbox-7", logger=LOG,
    ) as tun:
        assert _echo_once(tun.forward(0, server_port)) == b"ping"
    with pytest.raises(SandboxConfigError, match="no host key for"):
        SSHTunnel(
            sshd.host, sshd.port, sshd.user, sshd.client_key.paramiko_key,
            known_hosts=known_hosts, host_alias="other",
        )
    with pytest.raises(SandboxConfigError, match="exactly one"):
        SSHTunnel(sshd.host, sshd.port, sshd.user, sshd.client_key.paramiko_key)


def test_server_without_common_cipher_fails_fast(tmp_path: Path) -> None:
    only_chacha = ["Ciphers chacha20-poly1305@openssh.com"]  # paramiko has no ChaCha20
    with running_sshd(tmp_path / "sshd", extra_config=only_chacha) as s:
        before = _sshd_connections(s)
        with (
            _tunnel(s) as tun,
            pytest.raises(SandboxConnectionError, match="no acceptable ciphers") as info,
        ):
            tun.ensure_connected(30)
        assert not isinstance(info.value, (HostKeyMismatch, SandboxTimeout))
        assert _sshd_connections(s) == before + 1


def test_wrong_client_key_is_reported(sshd: SSHServer) -> None:
    with (
        SSHTunnel(
            sshd.host, sshd.port, sshd.user, generate_keypair().paramiko_key,
            sshd.host_public_line, logger=LOG,
        ) as tun,
        pytest.raises(SandboxTimeout, match="refused the client key"),
    ):
        tun.ensure_connected(1.0)


# ---------------------------------------------------------------- drops and reconnects


def test_a_login_over_a_connection_dialed_ahead(sshd: SSHServer, server_port: int) -> None:
    """A warm-pool VM's sshd is dialed ahead: the login uses that connection (its banner
    already there), and a stale one (the server closed it) costs a fresh dial, not a failure."""
    before = _sshd_connections(sshd)
    dialed = socket.create_connection((sshd.host, sshd.port), timeout=10)
    assert dialed.recv(4, socket.MSG_PEEK) == b"SSH-", "no banner"
    _wait_until(lambda: _sshd_connections(sshd) == before + 1, 10, "sshd to log the connection")
    with _tunnel(sshd, sock=dialed) as tun:
        tun.ensure_connected(10)
        assert _echo_once(tun.forward(0, server_port)) == b"ping"
        assert _sshd_connections(sshd) == before + 1, "the tunnel dialed again instead of using its connection"
        assert tun.used_dialed
    with socket.socket() as elsewhere:
        elsewhere.bind(("127.0.0.1", 0))
        elsewhere.listen(1)
        stale = socket.create_connection(elsewhere.getsockname(), timeout=10)
        elsewhere.accept()[0].close()  # as sshd does after LoginGraceTime
        with _tunnel(sshd, sock=stale) as tun:
            tun.ensure_connected(10)
            assert _echo_once(tun.forward(0, server_port)) == b"ping"
            assert not tun.used_dialed
    assert stale.fileno() == -1, "the stale connection was not closed"
    assert _sshd_connections(sshd) == before + 2


def test_reconnects_after_the_connection_drops(tunnel: SSHTunnel, server_port: int) -> None:
    port = tunnel.forward(0, server_port)
    old = tunnel._transport
    with _connect(port) as long_lived:
        long_lived.sendall(b"echo\nbefore")
        assert _recv_exactly(long_lived, 6) == b"before"
        _drop_connection(tunnel)
        assert _recv_to_eof(long_lived) == b""  # its channel died with the connection
    # Made while the tunnel may still be reconnecting: it waits for the new connection.
    assert _echo_once(port, b"after") == b"after"
    assert tunnel.is_alive and tunnel._transport is not old
    assert tunnel.forwards == {port: ("127.0.0.1", server_port)}
    assert _listening(port) == ["0100007F"]


def test_channel_close_failing_on_a_dead_connection_stops_nothing(
    tunnel: SSHTunnel, server_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seen in CI: closing a channel whose connection just died raises EOFError in paramiko.

    A real drop produces that only by a narrow race, so the race's outcome is injected.
    """
    port = tunnel.forward(0, server_port)
    calls = []

    def failing_close(channel: paramiko.Channel) -> None:
        calls.append(channel)
        raise EOFError()

    with _connect(port) as long_lived:
        long_lived.sendall(b"echo\nbefore")
        assert _recv_exactly(long_lived, 6) == b"before"
        monkeypatch.setattr(paramiko.Channel, "close", failing_close)
        _drop_connection(tunnel)
        assert _recv_to_eof(long_lived) == b""
    _wait_until(lambda: calls, 5, "the pump to close the channel")
    monkeypatch.undo()
    assert _echo_once(port, b"after") == b"after"
    assert tunnel._forwards.thread is not None and tunnel._forwards.thread.is_alive()


def test_repeated_pump_failures_stop_the_thread_loudly(
    tunnel: SSHTunnel, server_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sandbox_kernels.ssh.pump import Pump

    port = tunnel.forward(0, server_port)
    assert _echo_once(port) == b"ping"
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    tunnel._logger.addHandler(handler)

    def broken(self: Pump, timeout: float, on_accept: object) -> None:
        raise RuntimeError("pump bug")

    try:
        monkeypatch.setattr(Pump, "run_once", broken)
        tunnel._forwards.wake()
        _wait_until(lambda: not tunnel._forwards.thread.is_alive(), 15, "the thread to give up")
    finally:
        tunnel._logger.removeHandler(handler)
    assert isinstance(tunnel.last_error, RuntimeError)
    assert any("failed 5 times in a row" in r.getMessage() for r in records)


def test_reconnects_after_sshd_restarts(
    tunnel: SSHTunnel, sshd: SSHServer, server_port: int
) -> None:
    port = tunnel.forward(0, server_port)
    assert _echo_once(port) == b"ping"
    sshd.restart()
    _wait_until(lambda: tunnel._transport is not None and tunnel.is_alive, 15, "reconnect")
    assert _echo_once(port, b"after restart") == b"after restart"


def test_connection_made_while_down_waits_for_the_reconnect(
    tunnel: SSHTunnel, sshd: SSHServer, server_port: int
) -> None:
    port = tunnel.forward(0, server_port)
    sshd.stop()
    _wait_until(lambda: not tunnel.is_alive, 10, "the tunnel to notice")
    restart = threading.Timer(1.0, sshd.start)
    restart.start()
    try:
        assert _echo_once(port, b"waited") == b"waited"  # held until sshd is back
    finally:
        restart.join()


def test_explicit_reconnect(tunnel: SSHTunnel, server_port: int) -> None:
    port = tunnel.forward(0, server_port)
    old = tunnel._transport
    tunnel.reconnect(10)
    assert tunnel._transport is not old and tunnel.is_alive
    assert _echo_once(port) == b"ping"


def test_gives_up_then_recovers_on_request(sshd: SSHServer, server_port: int) -> None:
    with _tunnel(sshd, reconnect_timeout=1.0, connect_timeout=1.0) as tun:
        tun.ensure_connected(10)
        port = tun.forward(0, server_port)
        sshd.stop()
        _wait_until(lambda: tun.gave_up, 10, "the tunnel to give up")
        assert not tun.is_alive and isinstance(tun.last_error, SandboxTimeout)
        assert _listening(port) == ["0100007F"]
        with _connect(port) as sock:
            assert sock.recv(10) == b""  # refused at once while down, not hung
        sshd.start()
        tun.reconnect(10)
        assert _echo_once(port) == b"ping"


def test_forward_before_connecting_waits_for_the_connection(
    sshd: SSHServer, server_port: int
) -> None:
    with _tunnel(sshd) as tun:
        port = tun.forward(0, server_port)
        assert _echo_once(port) == b"ping"
        assert tun.is_alive


def test_zmq_req_rep_survives_a_drop(tunnel: SSHTunnel) -> None:
    zmq = pytest.importorskip("zmq")
    context = zmq.Context()
    rep = context.socket(zmq.REP)
    req = context.socket(zmq.REQ)
    stop = threading.Event()
    server = threading.Thread(target=lambda: None)
    try:
        rep_port = rep.bind_to_random_port("tcp://127.0.0.1")

        def serve() -> None:
            while not stop.is_set():
                if rep.poll(50):
                    rep.send(b"re:" + rep.recv())

        server = threading.Thread(target=serve, name="test-zmq-rep", daemon=True)
        server.start()
        local = tunnel.forward(0, rep_port)
        # A request written just as the connection drops is lost, as on any network; ZMQ's
        # "lazy pirate" client re-sends after a timeout, which REQ_RELAXED allows.
        req.setsockopt(zmq.REQ_RELAXED, 1)
        req.setsockopt(zmq.REQ_CORRELATE, 1)
        req.setsockopt(zmq.LINGER, 0)
        req.connect(f"tcp://127.0.0.1:{local}")

        def ask(text: bytes) -> tuple[bytes, int]:
            for attempt in range(1, 6):
                req.send(text)
                if req.poll(3000):
                    return req.recv(), attempt
            raise AssertionError(f"no reply to {text!r} through the tunnel")

        assert ask(b"one") == (b"re:one", 1)
        _drop_connection(tunnel)
        reply, attempts = ask(b"two")
        assert reply == b"re:two"
        tunnel.reconnect(10)
        reply, attempts_after_reconnect = ask(b"three")
        assert reply == b"re:three"
        print(f"\nZMQ attempts after a drop: {attempts}, after reconnect(): "
              f"{attempts_after_reconnect}")
    finally:
        stop.set()
        if server.is_alive():
            server.join(5)
        req.close(0)
        rep.close(0)
        context.term()


# ---------------------------------------------------------------- remote commands


HOSTILE = ["$(touch /tmp/pwned)", "`id`", "a; rm -rf /nonexistent", "'quoted'", '"dq"',
           "back\\slash", "new\nline", "*", "-n", " spaced "]


def test_run_passes_arguments_literally(tunnel: SSHTunnel) -> None:
    code, out, err = tunnel.run(["printf", "%s\\0", *HOSTILE])
    assert code == 0 and err == b""
    assert out.split(b"\0")[:-1] == [h.encode() for h in HOSTILE]
    assert not os.path.exists("/tmp/pwned")


def test_run_reports_exit_code_stderr_and_stdin(tunnel: SSHTunnel) -> None:
    assert tunnel.run(["sh", "-c", "echo oops >&2; exit 7"]) == (7, b"", b"oops\n")
    data = os.urandom(3 * MB)
    code, out, _ = tunnel.run(["cat"], input=data)
    assert code == 0 and out == data
    with pytest.raises(SandboxTimeout):
        tunnel.run(["sleep", "5"], timeout=0.5)
    with pytest.raises(SandboxConfigError):
        tunnel.run("echo not a list")  # type: ignore[arg-type]


def test_write_file_is_atomic_and_private(tunnel: SSHTunnel, tmp_path: Path) -> None:
    folder = tmp_path / "files"
    folder.mkdir()
    target = folder / "we'ird $(name) `x`.txt"
    target.write_text("old")
    target.chmod(0o644)
    tunnel.write_file(str(target), b"new\0content")
    assert target.read_bytes() == b"new\0content"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    tunnel.write_file(str(target), b"shared", mode=0o640)
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    with pytest.raises(SandboxError, match="missing-dir"):
        tunnel.write_file(str(folder / "missing-dir" / "f"), b"x")
    assert [p.name for p in folder.iterdir()] == [target.name]  # no temporary file left


_CHILD = """
import os, signal, sys, time
out = sys.argv[1]
signal.signal(signal.SIGINT, lambda *a: open(out + ".int", "w").close())
with open(out, "w") as f:
    f.write(os.environ["HOSTILE"] + "\\0" + os.environ["PLAIN"] + "\\0" + os.getcwd())
print("child started", flush=True)
time.sleep(60)
"""


def test_start_detached_survives_drops_and_is_signalable(
    tunnel: SSHTunnel, tmp_path: Path
) -> None:
    out, log = tmp_path / "env.out", tmp_path / "child.log"
    hostile = "$(touch /tmp/pwned); `id` ; 'q' \"d\" \\ $HOME"
    pid = tunnel.start_detached(
        [sys.executable, "-c", _CHILD, str(out)],
        str(log),
        env={"HOSTILE": hostile, "PLAIN": "x"},
        cwd=str(tmp_path),
    )
    try:
        _wait_until(out.exists, 10, "the child to start")
        _wait_until(lambda: b"child started" in log.read_bytes(), 10, "the child's log")
        assert out.read_text().split("\0") == [hostile, "x", str(tmp_path)]
        assert not os.path.exists("/tmp/pwned")
        assert stat.S_IMODE(log.stat().st_mode) == 0o600
        assert os.getsid(pid) == pid  # its own session: no hang-up when SSH goes away

        _drop_connection(tunnel)
        tunnel.ensure_connected(10)
        assert tunnel.process_alive(pid)
        assert tunnel.process_exit_code(pid) is None

        assert tunnel.signal(pid, signal.SIGINT)  # an interrupt reaches the child...
        _wait_until(Path(f"{out}.int").exists, 10, "the child's SIGINT handler")
        assert tunnel.process_status(pid).state == "running"  # ...and kills nothing
        assert tunnel.signal(pid, signal.SIGTERM)
        _wait_until(lambda: tunnel.process_exit_code(pid) is not None, 10, "the child to exit")
        assert tunnel.process_exit_code(pid) == 128 + signal.SIGTERM
        assert not tunnel.signal(pid, signal.SIGTERM)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def test_detached_process_killed_hard_is_gone(tunnel: SSHTunnel, tmp_path: Path) -> None:
    log = tmp_path / "sleep.log"
    pid = tunnel.start_detached(["sleep", "60"], str(log))
    try:
        assert tunnel.process_status(pid).state == "running"
        assert tunnel.signal(pid, signal.SIGKILL)
        _wait_until(lambda: tunnel.process_status(pid).state != "running", 10, "the kill")
        with pytest.raises(SandboxNotFound, match=str(pid)):
            tunnel.process_exit_code(pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    with pytest.raises(SandboxConfigError, match="name"):
        tunnel.start_detached(["true"], str(log), env={"BAD NAME": "x"})
    with pytest.raises(SandboxConfigError, match="absolute"):
        tunnel.start_detached(["true"], "relative.log")
    with pytest.raises(SandboxConfigError):
        tunnel.signal(1, signal.SIGTERM)


# ---------------------------------------------------------------- closing


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_close_leaves_no_thread_and_no_listener(sshd: SSHServer, server_port: int) -> None:
    fds_before = _open_fds()
    tun = _tunnel(sshd)
    try:
        tun.ensure_connected(10)
        ports = [tun.forward(0, server_port), tun.forward(0, server_port)]
        open_conn = _connect(ports[0])
        open_conn.sendall(b"echo\nx")
        assert _recv_exactly(open_conn, 1) == b"x"
        assert tun.run(["true"]).exit_code == 0
        assert _tunnel_threads(tun)
    finally:
        tun.close()
    with open_conn:
        assert _recv_to_eof(open_conn) == b""
    assert _tunnel_threads(tun) == []
    for port in ports:
        assert _listening(port) == []
        with socket.socket() as probe:  # reusable: closed connections may be in TIME_WAIT
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", port))
            probe.listen()
    _wait_until(lambda: _open_fds() <= fds_before, 5, "file descriptors to be released")
    assert not tun.is_alive
    with pytest.raises(SandboxConnectionError, match="closed"):
        tun.ensure_connected(1)
    tun.close()  # twice is fine
