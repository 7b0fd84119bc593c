"""``sandbox-kernels image check``: boot a VM image once and check the guest contract.

The image boots in a throwaway VM assembled as a sandbox's is (:func:`.machine.assemble`, a
fresh seed with new host and client keys). Over the project's SSH tunnel -- host key pinned,
never trusted on first use -- the check verifies: login as ``executor`` with the seed's key
only, ``import ipykernel``, the seed's hostname, no outbound network, a listener on the guest's
127.0.0.1 reachable through a forward (the kernel's ZMQ path), no forwarding elsewhere, and no
seed secrets left readable. The domain and its overlay are always removed, also on failure and
Ctrl-C.
"""

from __future__ import annotations

import asyncio
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

from ...errors import SandboxError
from ...ssh.keys import generate_keypair, parse_public_key
from ...ssh.tunnel import SSHTunnel
from .accel import AccelChoice
from .golden import reseed
from .image import boot_files
from .libvirt_conn import DEFAULT_URI, LibvirtHost
from .machine import Machine, assemble
from .machine_parts import MachineConfig, MachineKeys
from .overlay import check_base_image, create_workspace

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
        machine: the VM.
        hostname: the hostname given in its seed.
        connect_timeout: seconds :meth:`connect` keeps retrying.
    """

    machine: Machine
    hostname: str
    connect_timeout: float = 60.0

    @property
    def name(self) -> str:
        """The libvirt domain name."""
        return self.machine.name

    @property
    def host(self) -> LibvirtHost:
        """The libvirt connection it runs on."""
        return self.machine.host

    @property
    def port(self) -> int:
        """The host port on 127.0.0.1 forwarded to the guest's sshd."""
        return self.machine.ssh_port

    @property
    def accel(self) -> AccelChoice | None:
        """The accelerator choice it runs with."""
        return self.machine.accel

    def connect(self) -> SSHTunnel:
        """An SSH tunnel logged in as executor, the host key pinned (close it after use).

        Raises:
            HostKeyMismatch: the guest's host key is not the seed's.
            SandboxError: no login within ``connect_timeout`` seconds.
        """
        return asyncio.run(self.machine.wait_ssh(self._login, self.connect_timeout, booting=False))

    async def _login(self) -> SSHTunnel:
        return await self.machine.open_tunnel(USER, self.connect_timeout, log)


@contextlib.contextmanager
def throwaway_vm(path: str | os.PathLike[str], kernel: str | None = None,
                 initrd: str | None = None, *, uri: str = DEFAULT_URI, accel: str = "auto",
                 memory_mib: int = 1024, boot_timeout: float = 180.0,
                 allow_network: bool = False, persistent: bool = False,
                 workspace_size: int = 0) -> Iterator[TrialVM]:
    """Boot ``path`` in a domain with a fresh seed; destroy (and undefine) it and its files after.

    The domain is transient unless ``persistent`` (defined first, as a runtime may do). A
    ``workspace_size`` (bytes) attaches an empty workspace disk the guest formats and mounts.
    The block starts once the guest prints its ready marker.

    The domain and its directory (overlay, seed, console log) are removed when the block
    ends, however it ends (exception, Ctrl-C).

    Raises:
        SandboxNotFound / SandboxError: missing or corrupt image, kernel or initrd.
        SandboxStartError / SandboxTimeout: the VM did not boot (the console tail is shown).
    """
    image = Path(path)
    base = check_base_image(image)
    kernel_path, initrd_path = _boot_files(image, base, kernel, initrd)
    machine_id = f"check-{secrets.token_hex(6)}"
    hostname = f"sk-{machine_id}"
    host = LibvirtHost(uri)
    workdir = Path(tempfile.mkdtemp(prefix="sandbox-kernels-check-",
                                    dir=os.environ.get("NIXOS_EPHEMERAL_VM_IMAGES_DIR") or None))
    machine: Machine | None = None
    try:
        host_key = generate_keypair(f"sandbox-kernels-host@{machine_id}")
        client_key = generate_keypair(f"sandbox-kernels-client@{machine_id}")
        keys = MachineKeys(host_key.private_openssh, host_key.public_line, client_key.public_line,
                           client=client_key.paramiko_key)
        workspace = create_workspace(workdir, workspace_size) if workspace_size else None
        config = MachineConfig(
            machine_id=machine_id, vm_dir=workdir, base_image=str(image), kernel=str(kernel_path),
            initrd=str(initrd_path) if initrd_path else None, hostname=hostname, accelerator=accel,
            memory_mib=memory_mib, allow_network=allow_network,
            workspace=str(workspace) if workspace else None,
            labels={"sandbox-kernels.purpose": "image-check"}, persistent=persistent)
        machine = assemble(config, keys, host, log)
        started = time.monotonic()
        asyncio.run(machine.boot())
        asyncio.run(machine.wait_ssh(_ready, boot_timeout))
        remaining = max(boot_timeout - (time.monotonic() - started), 10.0)
        yield TrialVM(machine, hostname, remaining)
    finally:
        try:
            if machine is not None:
                asyncio.run(machine.destroy())
        finally:
            host.close()
            shutil.rmtree(workdir, ignore_errors=True)


async def _ready() -> None:
    """The guest printed its ready marker: the throwaway VM's wait ends there."""


def check_image(path: str, kernel: str | None = None, initrd: str | None = None, *,
                uri: str = DEFAULT_URI, accel: str = "auto", memory_mib: int = 1024,
                boot_timeout: float = 180.0) -> str:
    """Boot the qcow2 ``path`` in a throwaway VM and check the guest contract.

    Args:
        path: the qcow2 image.
        kernel: the kernel for direct boot (default ``<image>.vmlinuz`` next to it).
        initrd: its initrd (default ``<image>.initrd`` next to it, if present).
        uri: the libvirt connection URI.
        accel: ``auto``, ``kvm`` or ``qemu`` (see :mod:`sandbox_kernels.vm.accel`).
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
        # paramiko logs each refused channel and the auth probe (expected results here).
        with _muted("paramiko.transport"), contextlib.closing(vm.connect()) as tunnel:
            ssh_up = time.monotonic() - vm.machine.started
            results = _run_checks(tunnel, vm.port, vm.hostname,
                                  parse_public_key(vm.machine.keys.host_public))
        results.append(_check_reseed(vm))
    total = time.monotonic() - started
    accel = vm.accel
    lines = [f"image check {path}",
             f"  accelerator: {accel.domain_type} ({accel.reason})" if accel else "",
             f"  boot: SANDBOX-READY after {vm.machine.ready_after:.1f} s, SSH login after {ssh_up:.1f} s"]
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


def _run(tunnel: SSHTunnel, command: str, timeout: float = 30) -> tuple[int, str, str]:
    result = tunnel.run(["sh", "-c", command], None, timeout)
    out = result.stdout.decode(errors="replace").strip()
    return result.exit_code, out, result.stderr.decode(errors="replace").strip()


def _run_checks(client: SSHTunnel, port: int, hostname: str, pinned: paramiko.PKey) -> list[CheckResult]:
    checks: list[tuple[str, Callable[[], tuple[bool, str]]]] = [
        ("user is executor", lambda: _check_user(client)),
        ("python3 imports ipykernel", lambda: _check_ipykernel(client)),
        ("hostname from the seed", lambda: _check_hostname(client, hostname)),
        ("outbound network blocked", lambda: _check_outbound(client, port)),
        ("kernel can listen on 127.0.0.1 (via a forward)", lambda: _check_loopback(client)),
        ("no forwarding beyond the guest's loopback", lambda: _check_no_forwarding(client)),
        ("public-key authentication only", lambda: _check_auth_methods(port, pinned)),
        ("seed secrets not readable by executor", lambda: _check_secrets(client)),
    ]
    results = []
    for name, check in checks:
        try:
            ok, detail = check()
        except (SandboxError, OSError, EOFError, paramiko.SSHException) as e:
            ok, detail = False, f"{type(e).__name__}: {e}"
        results.append(CheckResult(name, ok, detail))
    return results


def _check_reseed(vm: TrialVM) -> CheckResult:
    """The reseed agent answers on ttyS1 and sshd serves again after it (golden snapshots)."""
    name = "reseed on ttyS1 (VMs restored from a golden snapshot)"
    try:
        took = reseed(str(vm.machine.spec.reseed_socket), 60)
        with _muted("paramiko.transport"), contextlib.closing(vm.connect()) as client:
            code, out, err = _run(client, "hostname")
    except (SandboxError, OSError, EOFError, paramiko.SSHException) as e:
        return CheckResult(name, False, f"{type(e).__name__}: {e}")
    ok = code == 0 and out == vm.hostname
    return CheckResult(name, ok, f"reseeded in {took:.1f} s; SSH login again, hostname {out!r}")


def _check_user(client: SSHTunnel) -> tuple[bool, str]:
    code, out, err = _run(client, "id -un; id -u")
    return code == 0 and out.split() == [USER, "1000"], out.replace("\n", " uid=") or err


def _check_ipykernel(client: SSHTunnel) -> tuple[bool, str]:
    start = time.monotonic()
    code, out, err = _run(client, "python3 -c 'import ipykernel; print(ipykernel.__version__)'", 120)
    took = time.monotonic() - start
    return code == 0, f"ipykernel {out} ({took:.1f} s)" if code == 0 else err[-300:]


def _check_hostname(client: SSHTunnel, hostname: str) -> tuple[bool, str]:
    code, out, err = _run(client, "hostname")
    return code == 0 and out == hostname, f"{out!r} (seed: {hostname!r})"


def _check_outbound(client: SSHTunnel, port: int) -> tuple[bool, str]:
    code, out, err = _run(client, f"python3 -c {shlex.quote(_OUTBOUND)} {int(port)}", 60)
    if code != 0:
        return False, err[-300:]
    if out:
        return False, f"reachable from the guest: {out}"
    return True, f"the host via 10.0.2.2:{port} unreachable"


def _check_loopback(client: SSHTunnel) -> tuple[bool, str]:
    # The listener runs detached, its port in a file; a forward then reaches it (ZMQ's path).
    code, out, err = _run(client, f"f=$(mktemp); python3 -c {shlex.quote(_GUEST_LISTENER)} >$f 2>&1 &"
                                  " while [ ! -s $f ]; do sleep 0.1; done; head -n1 $f; rm -f $f", 60)
    if code != 0 or not out.isdigit():
        return False, f"the guest's listener did not start: {out or err}"[-300:]
    guest_port = int(out)
    local = client.forward(0, guest_port)
    try:
        data = _receive(local, 4)
    finally:
        client.close_forward(local)
    return data == b"pong", f"127.0.0.1:{guest_port} answered {data!r}"


def _check_no_forwarding(client: SSHTunnel) -> tuple[bool, str]:
    local = client.forward(0, 22, "10.0.2.2")
    try:
        data = _receive(local, 4)
    finally:
        client.close_forward(local)
    if data:
        return False, f"sshd forwarded a connection to 10.0.2.2:22 (it answered {data!r})"
    return True, "a forward to 10.0.2.2:22 carried nothing (refused)"


def _receive(local_port: int, size: int) -> bytes:
    """Up to ``size`` bytes from a connection to the forward on ``local_port`` (b"" if closed)."""
    with socket.create_connection(("127.0.0.1", local_port), timeout=10) as sock:
        data = b""
        with contextlib.suppress(socket.timeout, ConnectionError):
            while len(data) < size:
                chunk = sock.recv(size - len(data))
                if not chunk:
                    break
                data += chunk
    return data


def _check_auth_methods(port: int, pinned: paramiko.PKey) -> tuple[bool, str]:
    """A second connection (not a login) asks which authentication methods sshd offers."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    probe = paramiko.Transport(sock)
    try:
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


def _check_secrets(client: SSHTunnel) -> tuple[bool, str]:
    code, out, _ = _run(client, "cat /etc/ssh/ssh_host_ed25519_key >/dev/null 2>&1 && echo key; "
                                "ls /run/sandbox-seed >/dev/null 2>&1 && echo seed-dir; "
                                "for d in /sys/block/*; do [ \"$(cat $d/serial 2>/dev/null)\" = "
                                "sandbox-seed ] && head -c1 /dev/${d##*/} >/dev/null 2>&1 "
                                "&& echo seed-disk; done; true")
    leaks = out.split()
    return not leaks, "host key, seed directory and seed disk unreadable" if not leaks \
        else f"readable by executor: {', '.join(leaks)}"
