"""The VM guest image and the libvirt pieces, against a real libvirtd and QEMU.

Builds (or reuses) the cached Debian guest, boots it in throwaway domains and checks the
guest contract, the seed disk, the domain XML builder, the accelerator choice, memory
snapshots over slirp networking, and that failed boots leave nothing behind.
"""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Iterator

import pytest

from sandbox_kernels import cli
from sandbox_kernels.errors import (
    SandboxConfigError,
    SandboxError,
    SandboxNotFound,
    SandboxStartError,
    SandboxTimeout,
    SandboxUnavailable,
)
from sandbox_kernels.runtimes.vm.image_check import throwaway_vm
from sandbox_kernels.runtimes.vm.image import boot_files, build_vm_image, default_image
from sandbox_kernels.ssh.keys import generate_keypair
from sandbox_kernels.runtimes.vm.access import blocking_dirs, ensure_emulator_access
from sandbox_kernels.runtimes.vm.accel import choose_domain_type, probe_kvm
from sandbox_kernels.runtimes.vm.domain_xml import QEMU_NS, DomainSpec, SnapshotSpec
from sandbox_kernels.runtimes.vm.libvirt_conn import LibvirtHost
from sandbox_kernels.runtimes.vm.overlay import create_overlay, image_info
from sandbox_kernels.runtimes.vm.seed import read_seed, write_seed_disk

pytestmark = pytest.mark.vm

CHECK_PREFIX = "sandbox-kernels-check-"


def _check_leftovers() -> tuple[list[str], list[str]]:
    with LibvirtHost() as host:
        domains = host.list_domains(CHECK_PREFIX)
    workdir = Path(os.environ.get("NIXOS_EPHEMERAL_VM_IMAGES_DIR") or "/tmp")
    return domains, sorted(str(p) for p in workdir.glob(f"{CHECK_PREFIX}*"))


@pytest.fixture(autouse=True)
def no_check_vm_left() -> Iterator[None]:
    """Each test leaves no throwaway domain and no overlay directory behind."""
    before = _check_leftovers()
    yield
    after = _check_leftovers()
    assert after == before, f"left behind: domains {after[0]}, directories {after[1]}"


@pytest.fixture(scope="module")
def image() -> str:
    """The cached Debian guest (built on first use, ~1 min)."""
    return build_vm_image()


def test_build_is_cached_and_linked(image: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second build reuses the cached image: no build step runs, no file is rewritten."""
    from sandbox_kernels.runtimes.vm import image as vm_image

    def no_build(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the cached image was rebuilt")

    monkeypatch.setattr(vm_image, "require_root", no_build)
    monkeypatch.setattr(vm_image, "run_step", no_build)
    files = [Path(image), *boot_files(image)]
    before = [(f.stat().st_ino, f.stat().st_mtime_ns) for f in files]
    start = time.monotonic()
    again = build_vm_image()
    took = time.monotonic() - start
    assert again == image
    assert [(f.stat().st_ino, f.stat().st_mtime_ns) for f in files] == before, "cached files were rewritten"
    assert default_image().resolve() == Path(image).resolve()
    kernel, initrd = boot_files(image)
    assert kernel.is_file() and initrd.is_file()
    for stable, real in zip(boot_files(default_image()), (kernel, initrd)):
        assert stable.resolve() == real.resolve()
    print(f"\ncached image build: {took:.2f} s")


def test_image_check_cli_passes(image: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["image", "check", str(default_image())]) == 0
    out = capsys.readouterr().out
    print(out)
    assert "FAIL" not in out
    assert out.count("PASS") >= 8
    assert "SANDBOX-READY after" in out


def _sh(tunnel: Any, command: str) -> tuple[int, str]:
    """Run ``command`` in the guest's shell over the throwaway VM's tunnel: (exit code, stdout)."""
    result = tunnel.run(["sh", "-c", command], None, 60)
    return result.exit_code, result.stdout.decode(errors="replace")


def test_memory_snapshot_and_revert_keep_ssh_over_slirp(image: str) -> None:
    with throwaway_vm(image, persistent=True) as vm:
        with vm.connect() as client:
            assert _sh(client, "echo before > /tmp/marker && echo A > ~/disk && sync")[0] == 0
        start = time.monotonic()
        vm.host.snapshot_create(vm.name, "snap1", memory=True, description="<test> & 'quotes'")
        took_create = time.monotonic() - start
        with vm.connect() as client:
            assert _sh(client, "echo after > /tmp/marker && echo B > ~/disk && sync")[0] == 0
        start = time.monotonic()
        vm.host.snapshot_revert(vm.name, "snap1")
        took_revert = time.monotonic() - start
        assert vm.host.state(vm.name) == "running"
        with vm.connect() as client:  # the old connection died with the reverted guest state
            assert _sh(client, "cat /tmp/marker ~/disk")[1].split() == ["before", "A"]
        print(f"\nmemory snapshot {took_create:.1f} s, revert {took_revert:.1f} s")
        with pytest.raises(SandboxConfigError):
            vm.host.snapshot_create(vm.name, "../evil", memory=True)
        with pytest.raises(SandboxNotFound):
            vm.host.snapshot_revert(vm.name, "no-such-snapshot")
        vm.host.snapshot_create(vm.name, "snap2", memory=True)
        vm.host.snapshot_delete(vm.name, "snap2")
        assert vm.host.snapshot_list(vm.name) == ["snap1"]
        # A persistent domain with snapshot metadata is destroyed and undefined in one call.
        assert vm.host.destroy(vm.name)
        assert vm.host.state(vm.name) == "missing"


_PROBE_HOST = (
    "import socket,sys\n"
    "s=socket.socket(); s.settimeout(5)\n"
    "try:\n"
    "    s.connect(('10.0.2.2', int(sys.argv[1]))); print('connected')\n"
    "except OSError as e:\n"
    "    print(type(e).__name__, e.errno)\n"
)


def test_network_flag_allows_outbound_but_not_the_host_loopback(image: str) -> None:
    with throwaway_vm(image, allow_network=True) as vm, vm.connect() as client:
        routes = _sh(client, "ip route; cat /etc/resolv.conf")[1]
        # Outbound goes through the passt NIC; slirp (eth0) keeps restrict=on.
        assert "default via 10.0.3.2" in routes and "nameserver 10.0.3.3" in routes, routes
        # 10.0.2.2 is slirp's host alias: the kernel's user fails fast on it (the guest's
        # rule), and nothing behind it answers anyway (restrict=on; tests/hostile/test_vm.py).
        result = _sh(client, f"python3 -c {shlex.quote(_PROBE_HOST)} {vm.port}")[1].strip()
        assert result.startswith("PermissionError 13"), result


def test_workspace_disk_is_formatted_mounted_and_snapshotted(image: str) -> None:
    with throwaway_vm(image, workspace_size=256 * 2**20) as vm:
        with vm.connect() as client:
            code, text = _sh(client, "stat -c '%U %a' ~/work && grep ' /home/executor/work ' "
                                     "/proc/mounts && echo one > ~/work/file && sync")
            assert code == 0, text
            assert text.startswith("executor ") and "ext4" in text and "nosuid" in text
        vm.host.snapshot_create(vm.name, "ws", memory=True)
        with vm.connect() as client:
            assert _sh(client, "echo two > ~/work/file && sync")[0] == 0
        vm.host.snapshot_revert(vm.name, "ws")  # memory and both disks go back together
        with vm.connect() as client:
            assert _sh(client, "cat ~/work/file")[1].strip() == "one"


def test_seed_disk_round_trip(tmp_path: Path) -> None:
    host, client = generate_keypair("h"), generate_keypair("c")
    path = write_seed_disk(tmp_path / "seed.img", host.private_openssh, client.public_line,
                           "guest-1", allow_network=True, random_seed=os.urandom(32),
                           workspace=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.stat().st_size % 512 == 0
    seed = read_seed(path)
    assert seed["ssh_host_ed25519_key"].decode() == host.private_openssh
    assert seed["authorized_keys"].decode().strip() == client.public_line
    assert seed["hostname"] == b"guest-1\n"
    assert len(seed["random_seed"]) == 32 and "network" in seed and "workspace" in seed
    # The guest reads it with GNU tar straight from the block device.
    listing = subprocess.run(["tar", "-tvf", str(path)], capture_output=True, text=True, check=True)
    assert "root/root" in listing.stdout and "-rw-------" in listing.stdout
    with tarfile.open(path) as tar:
        assert all(m.isfile() and m.mode == 0o600 for m in tar.getmembers())

    minimal = read_seed(write_seed_disk(tmp_path / "min.img", host.private_openssh,
                                        client.public_line, "guest-2"))
    assert set(minimal) == {"ssh_host_ed25519_key", "authorized_keys", "hostname"}
    for bad in ("evil host", "-x", "a;b", "x" * 64, "a\nb", "guest\n"):
        with pytest.raises(SandboxConfigError):
            write_seed_disk(tmp_path / "bad.img", host.private_openssh, client.public_line, bad)
    with pytest.raises(SandboxConfigError):
        write_seed_disk(tmp_path / "bad.img", client.public_line, client.public_line, "ok")


def _spec(**overrides: object) -> DomainSpec:
    values: dict[str, object] = dict(
        kernel_id="k1", domain_type="qemu", memory_mib=512, vcpus=1, kernel="/k", initrd="/i",
        root="/r.qcow2", seed="/s.img", serial_log="/log", ssh_port=2222)
    values.update(overrides)
    return DomainSpec(**values)  # type: ignore[arg-type]


def test_domain_xml_escapes_or_rejects_hostile_values() -> None:
    hostile = "/tmp/x'\"><qemu:commandline><qemu:arg value='-evil'/></qemu:commandline>&amp;"
    xml = _spec(serial_log=hostile, root=hostile + ".qcow2",
                labels={"owner": "</label><evil/>"}).to_xml()
    dom = ET.fromstring(xml)
    assert dom.find("./devices/serial/source").get("path") == hostile  # type: ignore[union-attr]
    assert dom.find("./devices/disk/source").get("file") == hostile + ".qcow2"  # type: ignore[union-attr]
    args = [a.get("value") for a in dom.iter(f"{{{QEMU_NS}}}arg")]
    assert args == ["-netdev", "user,id=sk0,restrict=on,ipv6=off,hostfwd=tcp:127.0.0.1:2222-:22",
                    "-device", "virtio-net-pci,netdev=sk0,id=sk-net0,bus=pci.0,addr=0x1e,romfile="]
    assert not list(dom.iter("evil"))
    assert dom.findtext("name") == "sandbox-kernels-k1"
    assert dom.findtext("./os/cmdline", "").startswith("console=ttyS0 root=/dev/vda rw init=/sbin/sandbox-init")
    assert [d.findtext("serial") for d in dom.iter("disk")] == ["sandbox-root", "sandbox-seed"]
    assert {e: dom.findtext(e) for e in ("on_poweroff", "on_reboot", "on_crash")} == \
        dict.fromkeys(("on_poweroff", "on_reboot", "on_crash"), "destroy")
    with_net = _spec(allow_network=True, outbound_socket="/state/outbound.sock").to_xml()
    assert "restrict=off" not in with_net and "restrict=on" in with_net
    assert "stream,id=sk1,server=off,addr.type=unix,addr.path=/state/outbound.sock" in with_net
    assert "mac=52:54:00:5a:4b:01" in with_net

    for bad in (dict(kernel_id="a'b"), dict(kernel_id="x</name><evil/>"), dict(kernel_id=""),
                dict(extra_cmdline=("init=/bin/sh; rm",)), dict(extra_cmdline=("a b",)),
                dict(domain_type="xen"), dict(ssh_port=22), dict(ssh_port="2222,hostfwd=x"),
                dict(labels={"bad key": "v"}), dict(kernel_id="k1\n"),
                dict(extra_cmdline=("quiet\n",)), dict(labels={"key\n": "v"}),
                dict(allow_network=True), dict(allow_network=True, outbound_socket="rel.sock"),
                dict(allow_network=True, outbound_socket="/a,b.sock")):
        with pytest.raises(SandboxConfigError):
            _spec(**bad).to_xml()

    snap = ET.fromstring(SnapshotSpec("s1", description="</description><evil/>").to_xml())
    assert snap.findtext("description") == "</description><evil/>"
    assert snap.find("memory").get("snapshot") == "internal"  # type: ignore[union-attr]
    for bad_name in ("a b", "../x", "<s>", ""):
        with pytest.raises(SandboxConfigError):
            SnapshotSpec(bad_name).to_xml()


def test_accelerator_choice_says_why(image: str) -> None:
    kernel, _ = boot_files(image)
    choice = choose_domain_type("auto", kernel, use_cache=False)
    print(f"\naccelerator: {choice}")
    if not Path("/dev/kvm").exists():
        assert choice.domain_type == "qemu" and "/dev/kvm" in choice.reason
    elif Path("/sys/module/kvm_pvm").exists():
        assert choice.domain_type == "qemu" and "kvm_pvm" in choice.reason
        ok, detail = probe_kvm(kernel, timeout=20)  # the probe agrees, and does not hang
        assert not ok, detail
    else:
        assert choice.domain_type == "kvm", choice.reason
    assert choose_domain_type("qemu").domain_type == "qemu"
    with pytest.raises(SandboxConfigError):
        choose_domain_type("fast")
    ok, detail = probe_kvm(kernel, timeout=60, accel="tcg")  # the marker is seen when it boots
    assert ok, detail


def test_boot_timeout_destroys_the_domain(image: str) -> None:
    with pytest.raises(SandboxTimeout, match="did not print SANDBOX-READY"):
        with throwaway_vm(image, boot_timeout=1):
            pass  # pragma: no cover - never reached


def test_failed_boot_is_reported_and_cleaned_up(image: str) -> None:
    kernel, _ = boot_files(image)
    # Without an initrd the kernel has no virtio_blk driver, cannot mount the root disk and
    # panics; panic=-1 and on_reboot=destroy end the VM.
    with pytest.raises(SandboxStartError, match="stopped") as info:
        with throwaway_vm(image, kernel=str(kernel), boot_timeout=120):
            pass  # pragma: no cover - never reached
    assert "Console:" in str(info.value)


def test_overlay_checks_the_base_and_the_disk_space(image: str, tmp_path: Path) -> None:
    overlay = create_overlay(default_image(), tmp_path / "k1")
    info = image_info(overlay)
    assert info["format"] == "qcow2"
    assert info["backing-filename"] == str(Path(image).resolve())  # never the symlink
    assert stat.S_IMODE((tmp_path / "k1").stat().st_mode) == 0o700
    with pytest.raises(SandboxNotFound, match="image build vm"):
        create_overlay(tmp_path / "missing.qcow2", tmp_path / "k2")
    raw = tmp_path / "raw.qcow2"
    raw.write_bytes(b"\0" * 65536)
    with pytest.raises(SandboxConfigError, match="not qcow2"):
        create_overlay(raw, tmp_path / "k3")
    corrupt = tmp_path / "corrupt.qcow2"
    corrupt.write_bytes(b"QFI\xfb" + b"\xff" * 508)
    with pytest.raises(SandboxError, match="unreadable or corrupt"):
        create_overlay(corrupt, tmp_path / "k4")
    with pytest.raises(SandboxUnavailable, match="NIXOS_EPHEMERAL_VM_IMAGES_DIR"):
        create_overlay(image, tmp_path / "k5", min_free=2**60)


def test_emulator_gets_search_access_only(tmp_path: Path) -> None:
    with LibvirtHost() as host:
        uid, gids = host.emulator_identity()
    if uid == 0:
        pytest.skip("QEMU runs as root here: nothing to grant")
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    target = private / "disk.qcow2"
    target.write_bytes(b"")
    assert private in blocking_dirs(target, uid, gids)
    ensure_emulator_access([target], uid, gids)
    assert blocking_dirs(target, uid, gids) == []
    mode = stat.S_IMODE(private.stat().st_mode)
    assert mode & 0o007 == 0, "others must not gain anything"
    listing = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gids[0]}", "--clear-groups",
                              "ls", str(private)], capture_output=True, text=True)
    assert listing.returncode != 0, "search access must not allow listing"
    reach = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gids[0]}", "--clear-groups",
                            "stat", str(target)], capture_output=True, text=True)
    assert reach.returncode == 0, reach.stderr


def test_libvirt_down_is_an_actionable_error() -> None:
    host = LibvirtHost("qemu+unix:///system?socket=/nonexistent/libvirt-sock")
    with pytest.raises(SandboxUnavailable, match="libvirtd -d"):
        host.connect()


def test_outbound_ruleset_rejects_this_machine_for_passts_user_only(tmp_path: Path) -> None:
    from sandbox_kernels.runtimes.vm.outbound import TABLE, ruleset

    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.53\nnameserver 10.255.255.53\nnameserver ::1\nnameserver bogus\n")
    rules = ruleset(995, str(resolv))
    assert rules.startswith(f"table inet {TABLE}\ndelete table inet {TABLE}\n")  # atomic replace
    assert "meta skuid 995 fib daddr type { local, broadcast, multicast, anycast } counter reject" in rules
    # DNS to a loopback resolver of the host stays possible, port 53 only; nothing else is let through.
    assert "meta skuid 995 ip daddr 127.0.0.53 meta l4proto { tcp, udp } th dport 53 accept" in rules
    assert "meta skuid 995 ip6 daddr ::1 meta l4proto { tcp, udp } th dport 53 accept" in rules
    assert "10.255.255.53" not in rules and "bogus" not in rules
    assert all(line.strip().startswith("meta skuid 995 ") for line in rules.splitlines()
               if line.strip().endswith(("accept", "reject")))
    check = subprocess.run(["nft", "-c", "-f", "-"], input=rules.replace(f"delete table inet {TABLE}\n", ""),
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
