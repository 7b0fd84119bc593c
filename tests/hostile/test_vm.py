"""VM-specific attacks: guest root against the host with ``allow_network``, the slot directory,
the serial console.

Guest root: the shipped guest gives the kernel's user no way to root (no sudo, no root login),
and the threat is guest root all the same (a guest kernel exploit). These tests boot a copy of
the shipped image with one change made here, on the host, with ``debugfs``: a set-uid root copy
of the guest's python3 at ``/usr/local/bin/rootpy``. The shipped image is not changed.

Network rule: the attacks aim only at listeners the test opens on the host's 127.0.0.1, at
slirp's alias of it (10.0.2.2, which never leaves QEMU), at the host end of a veth link the test
creates, and at a listener inside a network namespace the test creates.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
from jupyter_client import AsyncKernelManager
from jupyter_client.kernelspec import KernelSpecManager
from traitlets.config import Config

from helpers.netns import network_namespace
from hostile.suite import HostileRuntime, HostileSuite, LoopbackListener, SnapshotAttacks
from lifecycle import run_cell

pytestmark = [pytest.mark.hostile, pytest.mark.vm]

EXEC_TIMEOUT = 240
START_TIMEOUT = 400
ROOTPY = "/usr/local/bin/rootpy"
MiB = 1 << 20


def _domains() -> list[str]:
    out = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
                         capture_output=True, text=True, check=True, timeout=30)
    return out.stdout.split()


def _base_image() -> Path:
    from sandbox_kernels.runtimes.vm.image import default_image

    return Path(os.environ.get("NIXOS_SANDBOX_BASE_IMAGE") or default_image()).resolve()


@pytest.fixture(scope="module")
def root_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The shipped image plus a set-uid root python3 (``rootpy``): guest root on demand."""
    base = _base_image()
    out = tmp_path_factory.mktemp("rootpy-image")
    raw, python = out / "root.raw", out / "python3"
    image = out / "rootpy.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(base), str(raw)], check=True, timeout=600)
    commands = (f"dump -p /usr/bin/python3.11 {python}\n")
    subprocess.run(["debugfs", "-f", "-", str(raw)], input=commands, text=True, check=True,
                   capture_output=True, timeout=120)
    assert python.stat().st_size > 1 * MiB, "python3 not found in the guest image"
    commands = (f"write {python} {ROOTPY}\n"
                f"set_inode_field {ROOTPY} mode 0104755\n"
                f"set_inode_field {ROOTPY} uid 0\n"
                f"set_inode_field {ROOTPY} gid 0\n")
    subprocess.run(["debugfs", "-w", "-f", "-", str(raw)], input=commands, text=True, check=True,
                   capture_output=True, timeout=120)
    listing = subprocess.run(["debugfs", "-R", f"stat {ROOTPY}", str(raw)], capture_output=True,
                             text=True, check=True, timeout=60).stdout
    assert "Mode:  04755" in listing and "User:     0" in listing, listing
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(image)], check=True, timeout=600)
    raw.unlink()
    python.unlink()
    for suffix in (".vmlinuz", ".initrd"):
        shutil.copyfile(base.with_suffix(suffix), image.with_suffix(suffix))
    os.chmod(out, 0o755)
    yield image
    shutil.rmtree(out, ignore_errors=True)


@contextlib.asynccontextmanager
async def vm_kernel(kernelspec_dir: Any, name: str, admin: dict[str, Any] | None = None,
                    **config: Any) -> Any:
    """A VM kernel with ``admin`` settings from Jupyter config and ``config`` from its kernelspec."""
    kdir = kernelspec_dir("sandbox-nixos-vm", name=name, **config)
    km = AsyncKernelManager(kernel_name=name, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kdir)]),
                            config=Config({"LibvirtProvisioner": admin or {}}))
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=START_TIMEOUT)
        yield km, kc
    finally:
        kc.stop_channels()
        if km.has_kernel:
            await km.shutdown_kernel(now=True)
        assert f"sandbox-kernels-{km.kernel_id}" not in _domains(), "VM left after shutdown"


@pytest.fixture
def root_env(root_image: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The server (admin) runs VMs from the rootpy image."""
    monkeypatch.setenv("NIXOS_SANDBOX_BASE_IMAGE", str(root_image))
    return root_image


async def _cell(kc: Any, code: str, timeout: float = EXEC_TIMEOUT) -> str:
    out = await run_cell(kc, code, timeout=timeout)
    assert out["error"] is None, out
    return str(out["stdout"])


#: Runs as guest root (through rootpy): remove every filter and route the guest has, then try
#: each target through every NIC, with connect() and with raw SYNs that bypass the guest's
#: routing (slirp and passt open a host connection for any SYN they get). Prints one line per
#: target: "<label> connected|<error>".
GUEST_ROOT_ATTACK = r'''
import json, os, random, socket, struct, subprocess, sys, time
os.setresgid(0, 0, 0); os.setresuid(0, 0, 0)
targets = json.loads(sys.argv[1])
sh = lambda c: subprocess.run(c, shell=True, capture_output=True, text=True).stdout
for pref in sh("ip rule show").split("\n"):
    if pref.split(":")[0].strip() not in ("", "0", "32766", "32767"):
        sh("ip rule del pref " + pref.split(":")[0].strip())
sh("nft flush ruleset 2>/dev/null; iptables -F 2>/dev/null")
print("uid", os.getuid(), "rules", sh("ip rule show").count("\n"))
nics = {}
for nic in os.listdir("/sys/class/net"):
    mac = open(f"/sys/class/net/{nic}/address").read().strip()
    addrs = sh(f"ip -4 -o addr show dev {nic}").split()
    if nic != "lo" and "inet" in addrs:
        nics[nic] = (mac, addrs[addrs.index("inet") + 1].split("/")[0])
def neighbour(nic, gateway):
    # Known from earlier traffic (SSH replies on slirp, the namespace connect on the outbound
    # NIC): nothing is sent to a gateway address, which passt would forward off this machine.
    line = sh(f"ip neigh show {gateway} dev {nic}").split()
    return line[line.index("lladdr") + 1] if "lladdr" in line else None
def checksum(data):
    if len(data) % 2: data += b"\0"
    s = sum(struct.unpack(f"!{len(data)//2}H", data)); s = (s >> 16) + (s & 0xffff); s += s >> 16
    return ~s & 0xffff
def syn(nic, src_mac, gw_mac, src, dst, port):
    sport = random.randint(20000, 60000)
    tcp = struct.pack("!HHIIBBHHH", sport, port, random.getrandbits(32), 0, 5 << 4, 0x02, 64240, 0, 0)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", checksum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), random.getrandbits(16), 0, 64, 6, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    eth = bytes.fromhex(gw_mac.replace(":", "")) + bytes.fromhex(src_mac.replace(":", "")) + b"\x08\x00"
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
        s.bind((nic, 0))
        for _ in range(3):
            s.send(eth + ip + tcp)
            time.sleep(0.3)
gateways = {"10.0.2.": "10.0.2.2", "10.0.3.": "10.0.3.2"}
for label, host, port, how in targets:
    if how == "connect":
        for nic, (mac, addr) in sorted(nics.items(), key=lambda n: not n[1][1].startswith("10.0.3.")):
            gateway = gateways.get(addr.rsplit(".", 1)[0] + ".")
            if gateway and host.startswith("10.231."):
                sh(f"ip route replace {host}/32 via {gateway} dev {nic}")
                break
        try:
            socket.create_connection((host, port), timeout=5).close()
            print(label, "connected")
        except OSError as e:
            print(label, type(e).__name__)
    else:  # raw SYNs out of every NIC, to its gateway's MAC
        for nic, (mac, addr) in nics.items():
            gateway = gateways.get(addr.rsplit(".", 1)[0] + ".")
            gw_mac = gateway and neighbour(nic, gateway)
            if gw_mac:
                syn(nic, mac, gw_mac, addr, host, port)
                print(label, "sent", nic, file=sys.stderr)
        print(label, "sent")
'''


async def test_guest_root_with_allow_network_cannot_reach_the_host(kernelspec_dir: Any, root_env: Path) -> None:
    """Guest root drops the guest's filters and goes for the host's 127.0.0.1 (the test's
    listener, this kernel's SSH forward), slirp's alias of it, raw SYNs to 127.0.0.1 and the
    host's address on a test veth link: nothing connects. A listener in the test's namespace,
    outside this machine's addresses, is reached: outbound network works."""
    loopback = LoopbackListener()
    with network_namespace("vmout") as ns:
        host_side = LoopbackListener.__new__(LoopbackListener)
        _listen_on(host_side, ns.host_ip)
        inside = subprocess.Popen(
            ["ip", "netns", "exec", ns.name, sys.executable, "-c", _NETNS_SERVER, ns.guest_ip],
            stdout=subprocess.PIPE, text=True)
        try:
            ns_port = int(inside.stdout.readline())  # type: ignore[union-attr]
            async with vm_kernel(kernelspec_dir, "rootnet", admin={"allow_network": True},
                                 golden_snapshot=False) as (km, kc):
                forward = int(km.provisioner.ssh_port)
                targets = [  # the namespace first: its connect teaches the guest passt's MAC
                    ("netns", ns.guest_ip, ns_port, "connect"),
                    ("loopback-alias", "10.0.2.2", loopback.port, "connect"),
                    ("forward-alias", "10.0.2.2", forward, "connect"),
                    ("loopback-raw", "127.0.0.1", loopback.port, "raw"),
                    ("forward-raw", "127.0.0.1", forward, "raw"),
                    ("any-raw", "0.0.0.0", loopback.port, "raw"),
                    ("host-veth", ns.host_ip, host_side.port, "connect"),
                ]
                rejected = _rejected()
                out = await _cell(kc, (
                    "import subprocess\n"
                    f"r = subprocess.run([{ROOTPY!r}, '-c', {GUEST_ROOT_ATTACK!r}, "
                    f"{json.dumps(targets)!r}], capture_output=True, text=True, timeout=200)\n"
                    "print(r.stdout, r.stderr[-2000:])"), timeout=EXEC_TIMEOUT * 2)
                rejected = _rejected() - rejected
        finally:
            inside.terminate()
            inside.wait(10)
            loopback.close()
            host_side.close()
    assert "uid 0 " in out, f"the attack did not run as guest root: {out}"
    results = dict(line.split(None, 1) for line in out.splitlines() if line.split()[:1] and
                   line.split()[0] in {t[0] for t in targets})
    print("\n" + out)
    assert loopback.accepted == 0, f"guest root reached the host's 127.0.0.1: {out}"
    assert host_side.accepted == 0, f"guest root reached this machine's address {ns.host_ip}: {out}"
    assert results.get("loopback-alias") != "connected" and results.get("forward-alias") != "connected", out
    assert results.get("host-veth") != "connected", out
    assert results.get("netns") == "connected", f"outbound network does not work: {out}"
    # The raw SYNs to 127.0.0.1 and the veth connect reached passt, and the host's rule
    # stopped them there (not the guest, not luck).
    assert rejected >= 4, f"the nftables rule rejected only {rejected} packets: {out}"


def _rejected() -> int:
    """Packets the outbound rule has rejected so far."""
    from sandbox_kernels.runtimes.vm.outbound import TABLE

    proc = subprocess.run(["nft", "-j", "list", "table", "inet", TABLE], capture_output=True,
                          text=True, check=True, timeout=30)
    total = 0
    for item in json.loads(proc.stdout)["nftables"]:
        for expr in item.get("rule", {}).get("expr", []):
            total += expr.get("counter", {}).get("packets", 0)
    return total


#: Runs inside the test's namespace: accept connections on the given address, print the port.
_NETNS_SERVER = r'''
import socket, sys
s = socket.socket(); s.bind((sys.argv[1], 0)); s.listen(16)
print(s.getsockname()[1], flush=True)
while True:
    c, _ = s.accept(); c.close()
'''


def _listen_on(listener: LoopbackListener, address: str) -> None:
    """A LoopbackListener bound to ``address`` instead of 127.0.0.1."""
    import socket
    import threading

    listener.sock = socket.socket()
    listener.sock.bind((address, 0))
    listener.sock.listen(16)
    listener.sock.settimeout(0.2)
    listener.port = listener.sock.getsockname()[1]
    listener.accepted = 0
    listener._stop = threading.Event()
    listener._thread = threading.Thread(target=listener._run, daemon=True)
    listener._thread.start()


#: Runs as the kernel's user: connect to each (label, host, port); one line per target.
_CONNECT = r'''
import socket
for label, host, port in {targets!r}:
    try:
        socket.create_connection((host, port), timeout=5).close()
        print(label, "connected")
    except OSError as e:
        print(label, type(e).__name__)
'''


async def test_allow_network_works_from_golden_snapshots_and_through_rollbacks(kernelspec_dir: Any) -> None:
    """A kernel with allow_network restored from its golden snapshot reaches the test's
    namespace and not the host's loopback, and still does after a memory rollback (same
    QEMU, same passt) and a disk rollback (a new QEMU, a new passt); no passt outlives it."""
    import secrets

    from sandbox_kernels.runtimes.vm.provisioner import LibvirtProvisioner
    from sandbox_kernels.runtimes.vm import outbound

    kdir = kernelspec_dir("sandbox-nixos-vm", name="netgold")
    spec = KernelSpecManager(kernel_dirs=[str(kdir)]).get_kernel_spec("netgold")
    builder = LibvirtProvisioner(kernel_id=f"golden-{secrets.token_hex(6)}", kernel_spec=spec,
                                 config=Config({"LibvirtProvisioner": {"allow_network": True}}))
    assert builder.allow_network
    await builder.build_golden()  # cached by key: a second run finds it
    loopback = LoopbackListener()
    with network_namespace("vmgold") as ns:
        inside = subprocess.Popen(
            ["ip", "netns", "exec", ns.name, sys.executable, "-c", _NETNS_SERVER, ns.guest_ip],
            stdout=subprocess.PIPE, text=True)
        try:
            ns_port = int(inside.stdout.readline())  # type: ignore[union-attr]
            targets = [("netns", ns.guest_ip, ns_port), ("loopback", "10.0.2.2", loopback.port)]
            probe = _CONNECT.format(targets=targets)
            async with vm_kernel(kernelspec_dir, "netgold", admin={"allow_network": True}) as (km, kc):
                from sandbox_kernels.snapshots.service import SnapshotService

                prov = km.provisioner
                assert prov.start_mode == "golden", "the allow_network kernel booted"
                passt = [pid for pid, kid in outbound.leftover_processes() if kid == km.kernel_id]
                assert len(passt) == 1, passt
                expected = "netns connected\nloopback PermissionError\n"
                assert await _cell(kc, probe) == expected
                service = SnapshotService(prov)
                await service.create("mem")
                await service.create("disk", kind="disk")
                assert await _cell(kc, probe) == expected
                await service.rollback("mem")
                assert await _cell(kc, probe) == expected, "outbound lost after a memory rollback"
                await service.rollback("disk")
                assert await _cell(kc, probe) == expected, "outbound lost after a disk rollback"
                now = [pid for pid, kid in outbound.leftover_processes() if kid == km.kernel_id]
                assert len(now) == 1 and now != passt, "the disk rollback's QEMU has its own passt"
                kernel_id = km.kernel_id
        finally:
            inside.terminate()
            inside.wait(10)
            loopback.close()
    assert loopback.accepted == 0
    assert not [pid for pid, kid in outbound.leftover_processes() if kid == kernel_id], "passt left"


#: Runs as another local user (nobody): a directory of its own with every slot lock taken.
_SLOT_SQUATTER = r'''
import fcntl, os, sys
d = sys.argv[1]
os.makedirs(d, exist_ok=True); os.chmod(d, 0o777)
held = []
for n in range(64):
    fd = os.open(os.path.join(d, f"slot-{n}.lock"), os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_EX)
    held.append(fd)
print("ready", flush=True)
sys.stdin.read()
'''


def _as_nobody() -> None:
    os.setgid(65534)
    os.setuid(65534)


async def test_another_users_slot_directory_neither_blocks_nor_redirects_starts(
        kernelspec_dir: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without XDG_RUNTIME_DIR the slots were in a shared directory next to the state root
    (``/tmp/sandbox-kernels-vm-slots``). Another user links that name to a directory of their
    own where they hold every slot lock: a start must neither wait for them nor touch it."""
    import tempfile

    shared = Path(tempfile.mkdtemp(prefix="sk-shared-tmp-"))  # stands for /tmp
    os.chmod(shared, 0o1777)
    request_cleanup = contextlib.ExitStack()
    request_cleanup.callback(shutil.rmtree, shared, True)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("SANDBOX_KERNELS_STATE_DIR", str(shared / "sandbox-kernels-0"))
    theirs = shared / "squatter"
    squatter = None
    try:
        squatter = subprocess.Popen(["/usr/bin/python3", "-c", _SLOT_SQUATTER, str(theirs)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                    preexec_fn=_as_nobody)
        assert squatter.stdout.readline().strip() == "ready"  # type: ignore[union-attr]
        subprocess.run(["ln", "-s", str(theirs), str(shared / "sandbox-kernels-vm-slots")], check=True,
                       preexec_fn=_as_nobody)
        before = sorted((p.name, p.lstat().st_uid, p.stat().st_size) for p in theirs.iterdir())
        async with vm_kernel(kernelspec_dir, "slots", queue_timeout=30) as (km, kc):
            assert await _cell(kc, "print(6 * 7)") == "42\n"
            from sandbox_kernels.runtimes.vm.slots import slots_dir

            held = km.provisioner._slot.path
            assert held.parent == slots_dir() and not str(held).startswith(str(shared)), held
        after = sorted((p.name, p.lstat().st_uid, p.stat().st_size) for p in theirs.iterdir())
        assert after == before, "the start touched the other user's directory"
    finally:
        if squatter is not None:
            squatter.stdin.close()  # type: ignore[union-attr]
            squatter.wait(10)
        request_cleanup.close()


def test_slot_directory_and_locks_must_be_ours(tmp_path: Path) -> None:
    """A slot directory that is a link, another user's, or open to others is refused; so is a
    lock file planted as a link (never followed)."""
    from sandbox_kernels.errors import SandboxUnavailable
    from sandbox_kernels.runtimes.vm.slots import try_acquire_slot

    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    os.chmod(tmp_path, 0o755)
    good = tmp_path / "slots"
    slot = try_acquire_slot(good, 1)
    assert slot is not None and (good.stat().st_mode & 0o777) == 0o700
    slot.release()
    (good / "slot-0.lock").unlink()
    (good / "slot-0.lock").symlink_to(victim)
    with pytest.raises(SandboxUnavailable, match="slot-0.lock"):
        try_acquire_slot(good, 1)
    link = tmp_path / "link"
    link.symlink_to(good)
    with pytest.raises(SandboxUnavailable, match="not a link"):
        try_acquire_slot(link, 1)
    other = tmp_path / "other"
    other.mkdir(mode=0o700)
    os.chown(other, 65534, 65534)
    with pytest.raises(SandboxUnavailable, match="uid 65534"):
        try_acquire_slot(other, 1)
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    with pytest.raises(SandboxUnavailable, match="mode 777"):
        try_acquire_slot(open_dir, 1)
    assert victim.read_text() == "keep\n"


#: Runs as guest root: write to the serial console (the host's console.log) for a while.
_CONSOLE_FLOOD = r'''
import os, sys, time
os.setresuid(0, 0, 0)
total, limit = 0, int(sys.argv[1])
block = (b"F" * 1023 + b"\n") * 64
started = time.monotonic()
with open("/dev/ttyS0", "wb", buffering=0) as tty:
    while total < limit and time.monotonic() - started < 240:
        total += tty.write(block)
print("wrote", total, "in", round(time.monotonic() - started, 1))
'''


def _virtlogd_cap() -> int:
    """The most bytes virtlogd keeps of one log: max_size times (max_backups + 1)."""
    values = {"max_size": 2 * MiB, "max_backups": 3}
    with contextlib.suppress(OSError):
        for line in Path("/etc/libvirt/virtlogd.conf").read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() in values and value.strip().isdigit():
                values[key.strip()] = int(value.strip())
    return values["max_size"] * (values["max_backups"] + 1)


async def test_console_flood_is_capped_on_the_host(kernelspec_dir: Any, root_env: Path) -> None:
    """Guest root floods the serial console: the host's copy (virtlogd rotates it at its
    max_size, keeping max_backups) stays under the cap, and the host reads only its tail.
    (~200 KB/s through the emulated UART under TCG: the flood takes about a minute.)"""
    cap = _virtlogd_cap()
    async with vm_kernel(kernelspec_dir, "flood", golden_snapshot=False) as (km, kc):
        state = km.provisioner.console_path.parent
        out = await _cell(kc, (
            "import subprocess\n"
            f"r = subprocess.run([{ROOTPY!r}, '-c', {_CONSOLE_FLOOD!r}, '{cap + 4 * MiB}'], "
            "capture_output=True, text=True, timeout=300)\n"
            "print(r.stdout, r.stderr[-2000:])"), timeout=EXEC_TIMEOUT * 2)
        wrote = int(out.split("wrote")[1].split()[0])
        logs = {p.name: p.stat().st_size for p in state.iterdir() if p.name.startswith("console.log")}
        print(f"\n{out.strip()}; host copies {logs} (cap {cap})")
        assert wrote > cap, f"the flood did not outgrow the cap: {out}"
        assert sum(logs.values()) <= cap + MiB, f"the console log grew past its cap: {logs}"
        text = await km.provisioner.diagnostics()
        assert len(text) <= 256 * 1024, "diagnostics read the flooded console unbounded"
        assert await _cell(kc, "print(6 * 7)") == "42\n"


class TestVMHostile(SnapshotAttacks, HostileSuite):
    """The shared hostile suite on a VM kernel (the shipped guest, allow_network off). The VM
    bounds memory and disk by its size; processes only by that memory (no pids limit in the
    guest), so the fork bomb stays bounded by its own count. 10.0.2.2 is slirp's alias of the
    host."""

    @pytest.fixture
    def hostile(self) -> HostileRuntime:
        return HostileRuntime(kernel_name="sandbox-nixos-vm",
                              sandbox_exists=lambda kid: f"sandbox-kernels-{kid}" in _domains(),
                              start_timeout=300, exec_timeout=EXEC_TIMEOUT, loopback_aliases=["10.0.2.2"],
                              process_limit=False, disk_limit=True, flood_bytes=64 << 20)
