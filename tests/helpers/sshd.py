"""A real OpenSSH server for tests: its own host key, config and authorized_keys in a temp dir.

``running_sshd(directory)`` starts ``/usr/sbin/sshd -D -e -f <config>`` on a free port of
127.0.0.1 (public-key login only) and always stops it, with every per-connection child, on
exit. The server can be restarted on the same port to cut established connections.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sandbox_kernels.ssh.keys import KeyPair, generate_keypair, write_private_key, write_public_key

SSHD = "/usr/sbin/sshd"
_CONFIG = """\
Port {port}
ListenAddress {host}
HostKey {host_key}
PidFile none
AuthorizedKeysFile {authorized_keys}
AuthenticationMethods publickey
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
AllowUsers {user}
AllowTcpForwarding yes
MaxSessions 100
MaxStartups 100:30:200
PrintMotd no
LogLevel VERBOSE
Subsystem sftp internal-sftp
"""


@dataclass
class SSHServer:
    """A running test sshd.

    Attributes:
        host: the listen address (127.0.0.1, or the namespace end of a veth link).
        netns: the network namespace sshd runs in (None: this one).
        port: its port.
        user: the user that may log in.
        host_key: the key pair sshd serves (pin ``host_key.public_line``).
        client_key: the key pair allowed to log in.
        directory: where config, keys and the log live.
    """

    host: str
    port: int
    user: str
    host_key: KeyPair
    client_key: KeyPair
    directory: Path
    extra_config: Sequence[str] = ()
    netns: str | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def host_public_line(self) -> str:
        return self.host_key.public_line

    @property
    def log_path(self) -> Path:
        return self.directory / "sshd.log"

    def log(self) -> str:
        """The server's log so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> None:
        """Start sshd on ``port`` and wait until it answers with its banner.

        Raises:
            RuntimeError: sshd exited or did not answer in 10 s (the log is in the message).
        """
        config = self._write_config()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [*(["ip", "netns", "exec", self.netns] if self.netns else []),
                 SSHD, "-D", "-e", "-f", str(config)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            )
        try:
            self._wait_ready(10.0)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop sshd and every per-connection child (SIGTERM, then SIGKILL); wait for them."""
        if self.process is None:
            return
        victims = [self.process.pid, *_descendants(self.process.pid)]
        _signal_all(victims, signal.SIGTERM)
        try:
            self.process.wait(5.0)
        except subprocess.TimeoutExpired:
            _signal_all(victims, signal.SIGKILL)
            self.process.wait(5.0)
        _wait_gone(victims, 5.0)
        self.process = None

    def restart(self) -> None:
        """Stop (cutting all connections) and start again on the same port."""
        self.stop()
        self.start()

    def _write_config(self) -> Path:
        host_key = write_private_key(self.directory / "ssh_host_ed25519_key", self.host_key)
        authorized = write_public_key(self.directory / "authorized_keys", self.client_key)
        text = _CONFIG.format(
            port=self.port, host_key=host_key, authorized_keys=authorized, user=self.user,
            host=self.host,
        )
        config = self.directory / "sshd_config"
        config.write_text("".join(f"{line}\n" for line in self.extra_config) + text)
        return config

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"sshd exited with {self.process.returncode}:\n{self.log()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.host, self.port), timeout=1.0) as sock,
            ):
                if sock.recv(64).startswith(b"SSH-2.0-"):
                    return
            time.sleep(0.05)
        raise RuntimeError(f"sshd did not answer on port {self.port}:\n{self.log()}")


@contextlib.contextmanager
def running_sshd(
    directory: Path,
    user: str | None = None,
    host_key: KeyPair | None = None,
    client_key: KeyPair | None = None,
    extra_config: Sequence[str] = (),
    host: str = "127.0.0.1",
    netns: str | None = None,
) -> Iterator[SSHServer]:
    """Run a test sshd for the duration of the ``with`` block; stop it even on failure.

    Args:
        directory: an empty directory for config, keys and log.
        user: the login user (default: the current user).
        host_key: the host key to serve (default: a fresh one).
        client_key: the key allowed to log in (default: a fresh one).
        extra_config: sshd_config lines placed first (the first value of a keyword wins).
    """
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    server = None
    for _ in range(5):
        server = SSHServer(
            host=host,
            netns=netns,
            port=_free_port(),
            user=user or getpass.getuser(),
            host_key=host_key or generate_keypair("test-host"),
            client_key=client_key or generate_keypair("test-client"),
            directory=directory,
            extra_config=extra_config,
        )
        try:
            server.start()
            break
        except RuntimeError as e:
            if "Address already in use" not in str(e):
                raise
    assert server is not None and server.process is not None, "no free port for sshd"
    try:
        yield server
    finally:
        server.stop()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _descendants(root: int) -> list[int]:
    """Pids of all processes below ``root``, read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _signal_all(pids: Sequence[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def _wait_gone(pids: Sequence[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < deadline and _running(pid):
            time.sleep(0.02)
        if _running(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
