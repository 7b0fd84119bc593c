"""The VM runtime's Machine without libvirt or QEMU: assembly, starts, waits and clean-up.

A fake libvirt connection (:class:`FakeHost`) stands in for :class:`LibvirtHost`; qemu-img,
the accelerator probe and the ACL grants are replaced by recorders. The engine suites
(tests/test_vm*.py) prove the real parts.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from sandbox_kernels.errors import SandboxConfigError, SandboxError, SandboxStartError, SandboxTimeout
from sandbox_kernels.runtimes.vm import golden, machine as machine_mod
from sandbox_kernels.runtimes.vm.accel import AccelChoice
from sandbox_kernels.runtimes.vm.machine import Machine, assemble
from sandbox_kernels.runtimes.vm.machine_parts import MachineConfig, MachineKeys, remove_files
from sandbox_kernels.runtimes.vm.seed import read_seed
from sandbox_kernels.ssh.keys import generate_keypair


class FakeHost:
    """The few LibvirtHost operations a Machine uses, recorded; failures on demand."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.domains: dict[str, str] = {}
        self.start_errors: list[Exception] = []
        self.destroy_error: Exception | None = None
        self.snapshots: list[str] = []

    def emulator_identity(self) -> tuple[int, list[int]]:
        return 0, [0]

    def start(self, spec: Any, paused: bool = False) -> str:
        self.calls.append(("start", spec.ssh_port))
        spec.to_xml()  # a real start validates the spec first
        if self.start_errors:
            raise self.start_errors.pop(0)
        self.domains[spec.name] = "paused" if paused else "running"
        return str(spec.name)

    def start_xml(self, name: str, xml: str) -> None:
        self.calls.append(("start_xml", xml))
        self.domains[name] = "running"

    def state(self, name: str) -> str:
        return self.domains.get(name, "missing")

    def destroy(self, name: str) -> bool:
        self.calls.append(("destroy", name))
        if self.destroy_error is not None:
            raise self.destroy_error
        return self.domains.pop(name, None) is not None

    def load_snapshot(self, name: str, snapshot: str) -> None:
        self.calls.append(("load_snapshot", snapshot))

    def resume(self, name: str) -> None:
        self.domains[name] = "running"

    def qmp(self, name: str, command: str, arguments: Any = None) -> Any:
        self.calls.append(("qmp", command))
        return []

    def snapshot_create(self, name: str, snapshot: str, memory: bool = True) -> None:
        self.snapshots.append(snapshot)

    def snapshot_revert(self, name: str, snapshot: str) -> None:
        self.calls.append(("revert", snapshot))

    def snapshot_list(self, name: str) -> list[str]:
        return list(self.snapshots)

    def snapshot_delete(self, name: str, snapshot: str) -> None:
        self.snapshots.remove(snapshot)

    def restart_xml(self, name: str) -> str:
        return "<domain/>"

    def snapshot_xmls(self, name: str) -> list[str]:
        return [f"<domainsnapshot>{s}</domainsnapshot>" for s in self.snapshots]

    def snapshot_redefine(self, name: str, xmls: list[str]) -> None:
        self.calls.append(("redefine", len(xmls)))


@pytest.fixture
def fake_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A base image, kernel and initrd as plain files; qemu-img, the probe and ACLs faked."""
    images = tmp_path / "images"
    images.mkdir()
    base, kernel = images / "guest.qcow2", images / "guest.vmlinuz"
    base.write_bytes(b"QFI\xfb")
    kernel.write_bytes(b"kernel")
    (images / "guest.cmdline").write_text("init=/nix/init\n")
    made: dict[str, Any] = {"overlays": [], "grants": []}

    def create_overlay(base_path: Any, directory: Any, name: str = "root.qcow2") -> Path:
        Path(directory).mkdir(mode=0o700, exist_ok=True)
        overlay = Path(directory) / name
        overlay.write_bytes(b"overlay")
        made["overlays"].append(overlay)
        return overlay

    monkeypatch.setattr(machine_mod.overlay, "check_base_image", lambda p: Path(p))
    monkeypatch.setattr(machine_mod.overlay, "create_overlay", create_overlay)
    monkeypatch.setattr(machine_mod, "choose_domain_type",
                        lambda setting, kernel: AccelChoice("qemu", "faked"))
    monkeypatch.setattr(machine_mod, "ensure_emulator_access",
                        lambda paths, uid, gids: made["grants"].append([str(p) for p in paths]))
    made.update(base=base, kernel=kernel, vm_dir=tmp_path / "vm")
    return made


def _config(images: dict[str, Any], **changes: Any) -> MachineConfig:
    config = MachineConfig(machine_id="k1", vm_dir=images["vm_dir"], base_image=str(images["base"]),
                           kernel=str(images["kernel"]), initrd=None, hostname="sandbox-k1",
                           extra_cmdline=("console=ttyS0",), labels={"owner": "me"})
    return dataclasses.replace(config, **changes)


def _keys() -> MachineKeys:
    host, client = generate_keypair("host"), generate_keypair("client")
    return MachineKeys(host.private_openssh, host.public_line, client.public_line, client=client.paramiko_key)


def test_assemble_makes_every_file_and_one_domain(fake_images: dict[str, Any]) -> None:
    keys = _keys()
    machine = assemble(_config(fake_images), keys, FakeHost())  # type: ignore[arg-type]
    vm_dir = fake_images["vm_dir"]
    spec = machine.spec
    assert (spec.root, spec.seed, spec.serial_log) == (
        str(vm_dir / "root.qcow2"), str(vm_dir / "seed.img"), str(vm_dir / "console.log"))
    assert spec.name == "sandbox-kernels-k1" and spec.domain_type == "qemu"
    assert 1024 <= spec.ssh_port <= 65535
    # The image's own words come first, then the configured ones (the last init= wins).
    assert spec.extra_cmdline == ("init=/nix/init", "console=ttyS0")
    assert (vm_dir / "console.log").stat().st_mode & 0o777 == 0o600
    seed = read_seed(vm_dir / "seed.img")
    assert seed["hostname"].decode().strip() == "sandbox-k1"
    assert seed["authorized_keys"].decode().strip() == keys.authorized
    assert b"OPENSSH PRIVATE KEY" in seed["ssh_host_ed25519_key"]
    assert len(seed["random_seed"]) == 32 and "network" not in seed and "workspace" not in seed
    # QEMU is given every file it opens, the base image and the kernel included.
    granted = fake_images["grants"][0]
    for path in (spec.root, spec.seed, spec.serial_log, str(fake_images["base"]), spec.kernel):
        assert path in granted
    assert "sandbox-kernels-k1" in spec.to_xml()


def test_assemble_with_network_and_workspace(fake_images: dict[str, Any], tmp_path: Path) -> None:
    workspace = tmp_path / "ws.qcow2"
    workspace.write_bytes(b"ws")
    machine = assemble(_config(fake_images, allow_network=True, workspace=str(workspace)),
                       _keys(), FakeHost())  # type: ignore[arg-type]
    seed = read_seed(machine.spec.seed)
    assert "network" in seed and "workspace" in seed
    assert machine.spec.outbound_socket == str(fake_images["vm_dir"] / "outbound.sock")
    assert [d.serial for d in machine.spec.disks()] == ["sandbox-root", "sandbox-seed", "sandbox-workspace"]


def test_assemble_refuses_a_missing_guest_kernel(fake_images: dict[str, Any]) -> None:
    with pytest.raises(SandboxConfigError, match="guest kernel"):
        assemble(_config(fake_images, kernel="/nonexistent/vmlinuz"), _keys(), FakeHost())  # type: ignore[arg-type]
    assert not fake_images["overlays"], "nothing is made before the inputs are checked"


def test_settings_are_checked_once_with_the_traits_bounds(fake_images: dict[str, Any]) -> None:
    machine = assemble(_config(fake_images), _keys(), FakeHost())  # type: ignore[arg-type]
    for bad in ({"memory_mib": 64}, {"vcpus": 65}, {"extra_cmdline": ("a;b",)}):
        with pytest.raises(SandboxConfigError):
            dataclasses.replace(machine.spec, **bad).to_xml()
    from sandbox_kernels.runtimes.vm.provisioner import LibvirtProvisioner

    for name, value in (("memory_mb", 64), ("vcpus", 65), ("extra_cmdline", ["a;b"])):
        with pytest.raises(SandboxConfigError):
            LibvirtProvisioner(**{name: value})


def _machine(fake_images: dict[str, Any], host: FakeHost | None = None, **changes: Any) -> Machine:
    return assemble(_config(fake_images, **changes), _keys(), host or FakeHost())  # type: ignore[arg-type]


def test_boot_moves_to_a_new_port_when_the_chosen_one_was_taken(fake_images: dict[str, Any]) -> None:
    host = FakeHost()
    machine = _machine(fake_images, host)
    first = machine.ssh_port
    host.start_errors = [SandboxStartError("Could not set up host forwarding rule 'tcp:...'")]
    asyncio.run(machine.boot())
    assert [c for c in host.calls if c[0] == "start"][0] == ("start", first)
    assert host.state(machine.name) == "running"
    assert len([c for c in host.calls if c[0] == "start"]) == 2


def test_boot_gives_up_after_three_ports_and_other_errors_at_once(fake_images: dict[str, Any]) -> None:
    host = FakeHost()
    machine = _machine(fake_images, host)
    host.start_errors = [SandboxStartError("host forwarding rule")] * 3
    with pytest.raises(SandboxStartError):
        asyncio.run(machine.boot())
    assert len(host.calls) == 3
    host.calls.clear()
    host.start_errors = [SandboxStartError("Permission denied")]
    with pytest.raises(SandboxStartError, match="Permission"):
        asyncio.run(machine.boot())
    assert len(host.calls) == 1


def _wait(machine: Machine, connect: Any = None, timeout: float = 2.0, **kw: Any) -> Any:
    async def ok() -> str:
        return "connected"

    return asyncio.run(machine.wait_ssh(connect or ok, timeout, **kw))


def test_wait_ssh_reports_a_failed_guest_with_its_reason(fake_images: dict[str, Any]) -> None:
    machine = _machine(fake_images)
    asyncio.run(machine.boot())
    machine.console.write_text("booting\nSANDBOX-FAILED: no root disk\n")
    with pytest.raises(SandboxStartError, match="failed to boot: no root disk") as info:
        _wait(machine)
    assert "Console:" in str(info.value)


def test_wait_ssh_reports_a_vm_that_stopped(fake_images: dict[str, Any]) -> None:
    host = FakeHost()
    machine = _machine(fake_images, host)
    asyncio.run(machine.boot())
    host.domains.clear()  # QEMU went away (a kernel panic with panic=-1)
    machine.console.write_text("Kernel panic - not syncing\n")
    with pytest.raises(SandboxStartError, match="stopped during boot") as info:
        _wait(machine)
    assert "Kernel panic" in str(info.value)


def test_wait_ssh_times_out_without_the_marker(fake_images: dict[str, Any]) -> None:
    machine = _machine(fake_images)
    asyncio.run(machine.boot())
    with pytest.raises(SandboxTimeout, match="did not print SANDBOX-READY within SOME_TIMEOUT=0.5 s"):
        _wait(machine, timeout=0.5, timeout_setting="SOME_TIMEOUT")


def test_wait_ssh_retries_the_login_after_the_marker(fake_images: dict[str, Any]) -> None:
    machine = _machine(fake_images)
    asyncio.run(machine.boot())
    machine.console.write_text("\x1b[0mSANDBOX-READY\n")
    attempts = []

    async def connect() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise SandboxError("connection refused")
        return "tunnel"

    assert _wait(machine, connect) == "tunnel"
    assert len(attempts) == 3 and machine.ready_after > 0

    async def never() -> None:
        raise SandboxError("connection refused")

    with pytest.raises(SandboxTimeout, match="sshd did not answer.*connection refused"):
        _wait(machine, never, timeout=0.5)


def test_restore_loads_the_golden_snapshot_and_reseeds(fake_images: dict[str, Any], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    host = FakeHost()
    machine = _machine(fake_images, host)
    overlay = tmp_path / "golden.qcow2"
    overlay.write_bytes(b"golden overlay")
    found = golden.Golden("key", overlay, "<domainsnapshot/>", 42, 0.0)
    reseeded = []
    monkeypatch.setattr(golden, "reseed", lambda path, timeout: reseeded.append(path) or 0.1)
    steps = asyncio.run(machine.restore(found, 5))
    assert set(steps) == {"copy", "revert", "reseed"}
    assert Path(machine.spec.root).read_bytes() == b"golden overlay"
    assert ("load_snapshot", golden.SNAPSHOT) in host.calls
    assert host.state(machine.name) == "running" and reseeded == [machine.spec.reseed_socket]


def test_reset_after_a_failed_restore_gives_a_fresh_overlay(fake_images: dict[str, Any],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    host = FakeHost()
    machine = _machine(fake_images, host)
    Path(machine.spec.root).write_bytes(b"half-copied golden overlay")
    asyncio.run(machine.boot(paused=True))
    machine.console.write_text("old console")
    asyncio.run(machine.reset())
    assert host.state(machine.name) == "missing"
    assert Path(machine.spec.root).read_bytes() == b"overlay"
    assert machine.console.read_bytes() == b""
    assert len(fake_images["overlays"]) == 2


def test_destroy_closes_the_outbound_link_even_when_libvirt_fails(fake_images: dict[str, Any]) -> None:
    host = FakeHost()
    machine = _machine(fake_images, host)
    closed = []

    class Link:
        def close(self) -> None:
            closed.append(True)

    machine.outbound = Link()  # type: ignore[assignment]
    host.destroy_error = SandboxError("libvirtd went away")
    with pytest.raises(SandboxError):
        asyncio.run(machine.destroy())
    assert closed == [True]


def test_memory_rollback_gives_the_guest_fresh_random_bytes(fake_images: dict[str, Any],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    host = FakeHost()
    machine = _machine(fake_images, host)
    asyncio.run(machine.boot())
    asyncio.run(machine.snapshot("s1", 5))
    before = read_seed(machine.spec.seed)["random_seed"]
    reseeded = []
    monkeypatch.setattr(golden, "reseed", lambda path, timeout: reseeded.append(timeout) or 0.1)
    asyncio.run(machine.rollback("s1", 5, reseed_timeout=7))
    after = read_seed(machine.spec.seed)
    assert ("revert", "s1") in host.calls and reseeded == [7]
    assert after["random_seed"] != before and after["hostname"].strip() == b"sandbox-k1"


def test_disk_rollback_restarts_the_domain_with_its_snapshot_metadata(
        fake_images: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    host = FakeHost()
    machine = _machine(fake_images, host)
    asyncio.run(machine.boot())
    asyncio.run(machine.snapshot("mem", 5))
    applied = []
    monkeypatch.setattr(machine_mod.disk_snapshots, "apply",
                        lambda files, name, timeout: applied.append((files, name)))
    asyncio.run(machine.rollback_disks("d1", ["/vm/root.qcow2"], 5))
    names = [c[0] for c in host.calls]
    assert names.index("destroy") < names.index("start_xml") < names.index("redefine")
    assert applied == [(["/vm/root.qcow2"], "d1")] and host.state(machine.name) == "running"


def test_remove_files_keeps_only_disks_when_asked(tmp_path: Path) -> None:
    vm_dir = tmp_path / "vm"
    vm_dir.mkdir()
    for name in ("root.qcow2", "seed.img", "console.log"):
        (vm_dir / name).write_bytes(b"x")
    remove_files(vm_dir, keep_disks=True)
    assert sorted(p.name for p in vm_dir.iterdir()) == ["root.qcow2"]
    remove_files(vm_dir)
    assert not vm_dir.exists()
    remove_files(vm_dir)  # idempotent
