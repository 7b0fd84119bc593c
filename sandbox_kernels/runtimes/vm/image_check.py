"""``sandbox-kernels image check``: boot a VM image once and check the guest contract.

The image boots in a throwaway libvirt domain with a fresh seed (new host and client keys),
exactly as a sandbox would. Over SSH -- host key pinned, never trusted on first use -- the
check verifies: login as ``executor`` with the seed's key only, ``import ipykernel``, the
seed's hostname, no outbound network, a listener on the guest's 127.0.0.1 reachable through a
``direct-tcpip`` channel (the kernel's ZMQ path), no forwarding elsewhere, and no seed secrets
left readable. The domain and its overlay are always removed, also on failure and Ctrl-C.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shlex
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import paramiko

from ...errors import HostKeyMismatch, SandboxConnectionError, SandboxError, SandboxTimeout
from ...ssh.keys import KeyPair, generate_keypair, parse_public_key
from .access import ensure_emulator_access
from .accel import AccelChoice, choose_domain_type
from .boot import free_port, wait_ready
from .golden import reseed
from .domain_xml import DomainSpec
from .libvirt_conn import DEFAULT_URI, LibvirtHost
from .outbound import OutboundLink
from .overlay import check_base_image, create_overlay, create_workspace
from .seed import write_seed_disk
from .image import boot_cmdline, boot_files

log = logging.getLogger("sandbox_kernels.vm")

USER = "executor"
_GUEST_LISTENER = (
    "import socket,sys\n"
    "s=socket.socket(); s.bind(('127.0.0.1',0)); s.listen(1)\n"
    "print(s.getsockname()[1], flush=True)\n"
    "s.settimeout(20); c,_=s.accept(); c.sendall(b'pong'); c.close()\n"
)
#: In the guest: the host's SSH forward through slirp's host alias (10.0.2.2) must be
#: unreachable (restrict=on). Nothing aims at any address outside this machine.
_OUTBOUND = (
    "import socket,sys\n"
    "ok=[]\n"
    "s=socket.socket(); s.settimeout(3)\n"
    "try:\n"
    "    s.connect(('10.0.2.2',int(sys.argv[1]))); ok.append('10.0.2.2:'+sys.argv[1])\n"
    "except OSError:\n"
    "    pass\n"
    "print(' '.join(ok))\n"
)


@dataclass
class CheckResult:
    """One contract check: its name, whether it passed, and what was seen."""

    name: str
    ok: bool
    detail: str


@dataclass
class TrialVM:
    """A booted throwaway VM (see :func:`throwaway_vm`).

    Attributes:
        name: the libvirt domain name.
        host: the libvirt connection it runs on.
        port: the host port on 127.0.0.1 forwarded to the guest's sshd.
        hostname: the hostname given in its seed.
        host_key: the guest's host key pair (its public half is pinned).
        client_key: the key pair that logs in as executor.
        accel: the accelerator choice it runs with.
        started: ``time.monotonic()`` when the domain was started.
        ready_after: seconds from start to ``SANDBOX-READY``.
        reseed_socket: the unix socket wired to the guest's reseed port (ttyS1).
        connect_timeout: seconds :meth:`connect` keeps retrying.
    """

    name: str
    host: LibvirtHost
    port: int
    hostname: str
    host_key: KeyPair
    client_key: KeyPair
    accel: AccelChoice
    started: float
    ready_after: float
    reseed_socket: str = ""
    connect_timeout: float = 60.0

    def connect(self) -> paramiko.SSHClient:
        """An SSH client logged in as executor, the host key pinned (see :func:`_connect`)."""
        return _connect(self.port, self.host_key.public_line, self.client_key.paramiko_key,
                        self.connect_timeout)


@contextlib.contextmanager
def throwaway_vm(path: str | os.PathLike[str], kernel: str | None = None,
                 initrd: str | None = None, *, uri: str = DEFAULT_URI, accel: str = "auto",
                 memory_mib: int = 1024, boot_timeout: float = 180.0,
                 allow_network: bool = False, persistent: bool = False,
                 workspace_size: int = 0) -> Iterator[TrialVM]:
    """Boot ``path`` in a domain with a fresh seed; destroy (and undefine) it and its files after.

    The domain is transient unless ``persistent`` (defined first, as a runtime may do). A
    ``workspace_size`` (bytes) attaches an empty workspace disk the guest formats and mounts.

    The domain and its directory (overlay, seed, console log) are removed when the block
    ends, however it ends (exception, Ctrl-C).

    Raises:
        SandboxNotFound / SandboxError: missing or corrupt image, kernel or initrd.
        SandboxStartError / SandboxTimeout: the VM did not boot (the console tail is shown).
    """
    image = Path(path)
    base = check_base_image(image)
    kernel_path, initrd_path = _boot_files(image, base, kernel, initrd)
    choice = choose_domain_type(accel, kernel_path)
    kernel_id = f"check-{secrets.token_hex(6)}"
    hostname = f"sk-{kernel_id}"
    host = LibvirtHost(uri)
    workdir = Path(tempfile.mkdtemp(prefix="sandbox-kernels-check-",
                                    dir=os.environ.get("NIXOS_EPHEMERAL_VM_IMAGES_DIR") or None))
    name = ""
    outbound: OutboundLink | None = None
    try:
        host_key = generate_keypair(f"sandbox-kernels-host@{kernel_id}")
        client_key = generate_keypair(f"sandbox-kernels-client@{kernel_id}")
        overlay = create_overlay(base, workdir)
        workspace = create_workspace(workdir, workspace_size) if workspace_size else None
        seed = write_seed_disk(workdir / "seed.img", host_key.private_openssh,
                               client_key.public_line, hostname, allow_network=allow_network,
                               random_seed=os.urandom(32), workspace=workspace is not None)
        serial_log = workdir / "console.log"
        files = [overlay, seed, kernel_path, base] + ([initrd_path] if initrd_path else []) + (
            [workspace] if workspace else [])
        uid, gids = host.emulator_identity()
        ensure_emulator_access(files, uid, gids)
        spec = DomainSpec(
            kernel_id=kernel_id, domain_type=choice.domain_type, memory_mib=memory_mib, vcpus=1,
            kernel=str(kernel_path), initrd=str(initrd_path) if initrd_path else None,
            root=str(overlay), seed=str(seed), serial_log=str(serial_log), ssh_port=free_port(),
            allow_network=allow_network, workspace=str(workspace) if workspace else None,
            reseed_socket=str(workdir / "reseed.sock"), extra_cmdline=boot_cmdline(image),
            outbound_socket=str(workdir / "outbound.sock") if allow_network else None,
            labels={"sandbox-kernels.purpose": "image-check"}, persistent=persistent,
        )
        started = time.monotonic()
        name = spec.name  # set first: a Ctrl-C during start must still destroy it
        if allow_network:
            outbound = OutboundLink(workdir / "outbound.sock", kernel_id, uid)
            outbound.start_with(lambda: host.start(spec))
        else:
            host.start(spec)
        ready = wait_ready(host, name, serial_log, boot_timeout)
        remaining = max(boot_timeout - (time.monotonic() - started), 10.0)
        yield TrialVM(name, host, spec.ssh_port, hostname, host_key, client_key, choice,
                      started, ready, str(spec.reseed_socket), remaining)
    finally:
        try:
            if name:
                host.destroy(name)
        finally:
            if outbound is not None:
                outbound.close()
            host.close()
            shutil.rmtree(workdir, ignore_errors=True)


def check_image(path: str, kernel: str | None = None, initrd: str | None = None, *,
                uri: str = DEFAULT_URI, accel: str = "auto", memory_mib: int = 1024,
                boot_timeout: float = 180.0) -> str:
    """Boot the qcow2 ``path`` in a throwaway VM and check the guest contract.

    Args:
        path: the qcow2 image.
        kernel: the kernel for direct boot (default ``<image>.vmlinuz`` next to it).
        initrd: its initrd (default ``<image>.initrd`` next to it, if present).
        uri: the libvirt connection URI.
        accel: ``auto``, ``kvm`` or ``qemu`` (see :mod:`sandbox_kernels.runtimes.vm.accel`).
        memory_mib: guest memory.
        boot_timeout: seconds allowed from VM start to a working SSH login.

    Returns:
        The report: boot times and one line per check.

    Raises:
        SandboxNotFound / SandboxError: missing or corrupt image, kernel or initrd.
        SandboxStartError / SandboxTimeout: the VM did not boot (the console tail is shown).
        HostKeyMismatch: the guest presented another host key than the seed's.
        SandboxError: one or more contract checks failed (the report lists them).
    """
    started = time.monotonic()
    with throwaway_vm(path, kernel, initrd, uri=uri, accel=accel, memory_mib=memory_mib,
                      boot_timeout=boot_timeout) as vm:
        # paramiko logs each login and each refused channel (an expected result here).
        with _muted("paramiko.transport"), contextlib.closing(vm.connect()) as client:
            ssh_up = time.monotonic() - vm.started
            results = _run_checks(client, vm.port, vm.hostname)
        results.append(_check_reseed(vm))
    total = time.monotonic() - started
    lines = [f"image check {path}",
             f"  accelerator: {vm.accel.domain_type} ({vm.accel.reason})",
             f"  boot: SANDBOX-READY after {vm.ready_after:.1f} s, SSH login after {ssh_up:.1f} s"]
    lines += [f"  {'PASS' if r.ok else 'FAIL'} {r.name}: {r.detail}" for r in results]
    lines.append(f"  total {total:.1f} s (VM destroyed, overlay removed)")
    report = "\n".join(lines)
    failed = [r.name for r in results if not r.ok]
    if failed:
        raise SandboxError(f"the image does not keep the guest contract ({', '.join(failed)}):\n"
                           f"{report}")
    return report


@contextlib.contextmanager
def _muted(logger_name: str) -> Iterator[None]:
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _boot_files(image: Path, base: Path, kernel: str | None,
                initrd: str | None) -> tuple[Path, Path | None]:
    """The kernel and initrd: given, or next to the image (as named, then resolved)."""
    if kernel:
        kernel_path = Path(kernel).resolve()
        initrd_path = Path(initrd).resolve() if initrd else None
    else:
        for candidate in (image, base):
            found_kernel, found_initrd = boot_files(candidate)
            if found_kernel.exists():
                kernel_path = found_kernel.resolve()
                initrd_path = Path(initrd).resolve() if initrd else (
                    found_initrd.resolve() if found_initrd.exists() else None)
                break
        else:
            raise SandboxError(
                f"no kernel next to {image} (expected {boot_files(image)[0].name}): pass "
                "--kernel and --initrd for direct kernel boot.")
    for needed in (kernel_path, initrd_path):
        if needed is not None and not needed.is_file():
            raise SandboxError(f"{needed} does not exist or is not a file.")
    return kernel_path, initrd_path


def _connect(port: int, host_public_line: str, key: paramiko.PKey,
             timeout: float) -> paramiko.SSHClient:
    """Log in as executor with the host key pinned; retry until sshd answers or ``timeout``.

    Raises:
        HostKeyMismatch: the guest's host key is not the seed's.
        SandboxTimeout: no successful login within ``timeout`` seconds.
    """
    pinned = parse_public_key(host_public_line)
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        client = paramiko.SSHClient()
        client.get_host_keys().add(f"[127.0.0.1]:{port}", pinned.get_name(), pinned)
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            client.connect("127.0.0.1", port=port, username=USER, pkey=key, timeout=10,
                           banner_timeout=10, auth_timeout=10, look_for_keys=False,
                           allow_agent=False)
            return client
        except paramiko.BadHostKeyException as e:
            client.close()
            raise HostKeyMismatch(
                f"the guest on 127.0.0.1:{port} presented host key {e.key.fingerprint}, not the "
                f"seed's {pinned.fingerprint}: the image ignores the seed's host key.") from e
        except paramiko.AuthenticationException as e:
            client.close()
            raise SandboxConnectionError(
                f"sshd in the guest refused the seed's client key for {USER}: {e}. The image "
                "must install the seed's authorized_keys for executor.") from e
        except (OSError, EOFError, paramiko.SSHException) as e:
            client.close()
            last = f"{type(e).__name__}: {e}"
        if time.monotonic() > deadline:
            raise SandboxTimeout(f"no SSH login to the guest within {timeout:.0f} s ({last}).")
        time.sleep(0.3)


def _run(client: paramiko.SSHClient, command: str, timeout: float = 30) -> tuple[int, str, str]:
    _, stdout, stderr = client.exec_command(command, timeout=timeout)
    out = stdout.read().decode(errors="replace").strip()
    err = stderr.read().decode(errors="replace").strip()
    return stdout.channel.recv_exit_status(), out, err


def _run_checks(client: paramiko.SSHClient, port: int, hostname: str) -> list[CheckResult]:
    checks: list[tuple[str, Callable[[], tuple[bool, str]]]] = [
        ("user is executor", lambda: _check_user(client)),
        ("python3 imports ipykernel", lambda: _check_ipykernel(client)),
        ("hostname from the seed", lambda: _check_hostname(client, hostname)),
        ("outbound network blocked", lambda: _check_outbound(client, port)),
        ("kernel can listen on 127.0.0.1 (via direct-tcpip)", lambda: _check_loopback(client)),
        ("no forwarding beyond the guest's loopback", lambda: _check_no_forwarding(client)),
        ("public-key authentication only", lambda: _check_auth_methods(client)),
        ("seed secrets not readable by executor", lambda: _check_secrets(client)),
    ]
    results = []
    for name, check in checks:
        try:
            ok, detail = check()
        except (OSError, EOFError, paramiko.SSHException) as e:
            ok, detail = False, f"{type(e).__name__}: {e}"
        results.append(CheckResult(name, ok, detail))
    return results


def _check_reseed(vm: TrialVM) -> CheckResult:
    """The reseed agent answers on ttyS1 and sshd serves again after it (golden snapshots)."""
    name = "reseed on ttyS1 (VMs restored from a golden snapshot)"
    try:
        took = reseed(vm.reseed_socket, 60)
        with _muted("paramiko.transport"), contextlib.closing(vm.connect()) as client:
            code, out, err = _run(client, "hostname")
    except (SandboxError, OSError, EOFError, paramiko.SSHException) as e:
        return CheckResult(name, False, f"{type(e).__name__}: {e}")
    ok = code == 0 and out == vm.hostname
    return CheckResult(name, ok, f"reseeded in {took:.1f} s; SSH login again, hostname {out!r}")


def _check_user(client: paramiko.SSHClient) -> tuple[bool, str]:
    code, out, err = _run(client, "id -un; id -u")
    return code == 0 and out.split() == [USER, "1000"], out.replace("\n", " uid=") or err


def _check_ipykernel(client: paramiko.SSHClient) -> tuple[bool, str]:
    start = time.monotonic()
    code, out, err = _run(client, "python3 -c 'import ipykernel; print(ipykernel.__version__)'", 120)
    took = time.monotonic() - start
    return code == 0, f"ipykernel {out} ({took:.1f} s)" if code == 0 else err[-300:]


def _check_hostname(client: paramiko.SSHClient, hostname: str) -> tuple[bool, str]:
    code, out, err = _run(client, "hostname")
    return code == 0 and out == hostname, f"{out!r} (seed: {hostname!r})"


def _check_outbound(client: paramiko.SSHClient, port: int) -> tuple[bool, str]:
    code, out, err = _run(client, f"python3 -c {shlex.quote(_OUTBOUND)} {int(port)}", 60)
    if code != 0:
        return False, err[-300:]
    if out:
        return False, f"reachable from the guest: {out}"
    return True, f"the host via 10.0.2.2:{port} unreachable"


def _check_loopback(client: paramiko.SSHClient) -> tuple[bool, str]:
    transport = client.get_transport()
    assert transport is not None
    stdin, stdout, stderr = client.exec_command(f"python3 -c {shlex.quote(_GUEST_LISTENER)}",
                                                timeout=30)
    guest_port = int(stdout.readline().strip())
    channel = transport.open_channel("direct-tcpip", ("127.0.0.1", guest_port),
                                     ("127.0.0.1", 0), timeout=10)
    try:
        channel.settimeout(10)
        data = b""
        while len(data) < 4:
            chunk = channel.recv(4 - len(data))
            if not chunk:
                break
            data += chunk
    finally:
        channel.close()
    stdout.channel.recv_exit_status()
    return data == b"pong", f"127.0.0.1:{guest_port} answered {data!r}"


def _check_no_forwarding(client: paramiko.SSHClient) -> tuple[bool, str]:
    transport = client.get_transport()
    assert transport is not None
    try:
        channel = transport.open_channel("direct-tcpip", ("10.0.2.2", 22), ("127.0.0.1", 0),
                                         timeout=10)
    except paramiko.ChannelException as e:
        return True, f"direct-tcpip to 10.0.2.2:22 refused ({e.text})"
    channel.close()
    return False, "sshd opened a direct-tcpip channel to 10.0.2.2:22"


def _check_auth_methods(client: paramiko.SSHClient) -> tuple[bool, str]:
    transport = client.get_transport()
    assert transport is not None
    peer = transport.getpeername()
    sock = socket.create_connection(peer[:2], timeout=10)
    probe = paramiko.Transport(sock)
    try:
        pinned = transport.get_remote_server_key()
        probe.start_client(timeout=10)
        if probe.get_remote_server_key() != pinned:
            return False, "a second connection saw another host key"
        try:
            probe.auth_none(USER)
        except paramiko.BadAuthenticationType as e:
            return e.allowed_types == ["publickey"], f"server offers {e.allowed_types}"
        return False, "the server accepted 'none' authentication"
    finally:
        probe.close()


def _check_secrets(client: paramiko.SSHClient) -> tuple[bool, str]:
    code, out, _ = _run(client, "cat /etc/ssh/ssh_host_ed25519_key >/dev/null 2>&1 && echo key; "
                                "ls /run/sandbox-seed >/dev/null 2>&1 && echo seed-dir; "
                                "for d in /sys/block/*; do [ \"$(cat $d/serial 2>/dev/null)\" = "
                                "sandbox-seed ] && head -c1 /dev/${d##*/} >/dev/null 2>&1 "
                                "&& echo seed-disk; done; true")
    leaks = out.split()
    return not leaks, "host key, seed directory and seed disk unreadable" if not leaks \
        else f"readable by executor: {', '.join(leaks)}"
