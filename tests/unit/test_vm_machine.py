"""The VM runtime's Machine without libvirt or QEMU: assembly, starts, waits and clean-up.

A fake libvirt connection (``helpers.vm_fakes.FakeHost``) stands in for ``LibvirtHost``;
qemu-img, the accelerator probe and the ACL grants are replaced by recorders. The engine suites
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
from sandbox_kernels.runtimes.vm.machine import Machine, assemble
from sandbox_kernels.runtimes.vm.machine_parts import MachineConfig, MachineKeys, remove_files
from sandbox_kernels.runtimes.vm.seed import read_seed
from sandbox_kernels.ssh.keys import generate_keypair

from helpers.vm_fakes import FakeHost, fake_images


@pytest.fixture
def images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    return fake_images(tmp_path, monkeypatch)


def _config(images: dict[str, Any], **changes: Any) -> MachineConfig:
    config = MachineConfig(machine_id="k1", vm_dir=images["vm_dir"], base_image=str(images["base"]),
                           kernel=str(images["kernel"]), initrd=None, hostname="sandbox-k1",
                           extra_cmdline=("console=ttyS0",), labels={"owner": "me"})
    return dataclasses.replace(config, **changes)


def _keys() -> MachineKeys:
    host, client = generate_keypair("host"), generate_keypair("client")
    return MachineKeys(host.private_openssh, host.public_line, client.public_line, client=client.paramiko_key)


def test_assemble_makes_every_file_and_one_domain(images: dict[str, Any]) -> None:
    keys = _keys()
    machine = assemble(_config(images), keys, FakeHost())  # type: ignore[arg-type]
    vm_dir = images["vm_dir"]
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
    granted = images["grants"][0]
    for path in (spec.root, spec.seed, spec.serial_log, str(images["base"]), spec.kernel):
        assert path in granted
    assert "sandbox-kernels-k1" in spec.to_xml()


def test_assemble_with_network_and_workspace(images: dict[str, Any], tmp_path: Path) -> None:
    workspace = tmp_path / "ws.qcow2"
    workspace.write_bytes(b"ws")
    machine = assemble(_config(images, allow_network=True, workspace=str(workspace)),
                       _keys(), FakeHost())  # type: ignore[arg-type]
    seed = read_seed(machine.spec.seed)
    assert "network" in seed and "workspace" in seed
    assert machine.spec.outbound_socket == str(images["vm_dir"] / "outbound.sock")
    assert [d.serial for d in machine.spec.disks()] == ["sandbox-root", "sandbox-seed", "sandbox-workspace"]


def test_assemble_refuses_a_missing_guest_kernel(images: dict[str, Any]) -> None:
    with pytest.raises(SandboxConfigError, match="guest kernel"):
        assemble(_config(images, kernel="/nonexistent/vmlinuz"), _keys(), FakeHost())  # type: ignore[arg-type]
    assert not images["overlays"], "nothing is made before the inputs are checked"


def test_settings_are_checked_once_with_the_traits_bounds(images: dict[str, Any]) -> None:
    machine = assemble(_config(images), _keys(), FakeHost())  # type: ignore[arg-type]
    for bad in ({"memory_mib": 64}, {"vcpus": 65}, {"extra_cmdline": ("a;b",)}):
        with pytest.raises(SandboxConfigError):
            dataclasses.replace(machine.spec, **bad).to_xml()
    from sandbox_kernels.runtimes.vm.provisioner import LibvirtProvisioner

    for name, value in (("memory_mb", 64), ("vcpus", 65), ("extra_cmdline", ["a;b"])):
        with pytest.raises(SandboxConfigError):
            LibvirtProvisioner(**{name: value})


def _machine(images: dict[str, Any], host: FakeHost | None = None, **changes: Any) -> Machine:
    return assemble(_config(images, **changes), _keys(), host or FakeHost())  # type: ignore[arg-type]


def test_boot_moves_to_a_new_port_when_the_chosen_one_was_taken(images: dict[str, Any]) -> None:
    host = FakeHost()
    machine = _machine(images, host)
    first = machine.ssh_port
    host.start_errors = [SandboxStartError("Could not set up host forwarding rule 'tcp:...'")]
    asyncio.run(machine.boot())
    assert [c for c in host.calls if c[0] == "start"][0] == ("start", first)
    assert host.state(machine.name) == "running"
    assert len([c for c in host.calls if c[0] == "start"]) == 2


def test_boot_gives_up_after_three_ports_and_other_errors_at_once(images: dict[str, Any]) -> None:
    host = FakeHost()
    machine = _machine(images, host)
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


def test_wait_ssh_reports_a_failed_guest_with_its_reason(images: dict[str, Any]) -> None:
    machine = _machine(images)
    asyncio.run(machine.boot())
    machine.console.write_text("booting\nSANDBOX-FAILED: no root disk\n")
    with pytest.raises(SandboxStartError, match="failed to boot: no root disk") as info:
        _wait(machine)
    assert "Console:" in str(info.value)


def test_wait_ssh_reports_a_vm_that_stopped(images: dict[str, Any]) -> None:
    host = FakeHost()
    machine = _machine(images, host)
    asyncio.run(machine.boot())
    host.domains.clear()  # QEMU went away (a kernel panic with panic=-1)
    machine.console.write_text("Kernel panic - not syncing\n")
    with pytest.raises(SandboxStartError, match="stopped during boot") as info:
        _wait(machine)
    assert "Kernel panic" in str(info.value)


def test_wait_ssh_times_out_without_the_marker(images: dict[str, Any]) -> None:
    machine = _machine(images)
    asyncio.run(machine.boot())
    with pytest.raises(SandboxTimeout, match="did not print SANDBOX-READY within SOME_TIMEOUT=0.5 s"):
        _wait(machine, timeout=0.5, timeout_setting="SOME_TIMEOUT")


def test_wait_ssh_retries_the_login_after_the_marker(images: dict[str, Any]) -> None:
    machine = _machine(images)
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


def test_restore_loads_the_golden_snapshot_and_reseeds(images: dict[str, Any], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    host = FakeHost()
    machine = _machine(images, host)
    overlay = tmp_path / "golden.qcow2"
    overlay.write_bytes(b"golden overlay")
    found = golden.Golden("key", overlay, "<domainsnapshot/>", 42, 0.0)
    reseeded = []
    monkeypatch.setattr(golden, "reseed", lambda path, timeout: reseeded.append(path) or 0.1)
    steps = asyncio.run(machine.restore(found, 5, on_reseed=lambda: reseeded.append("announced")))
    assert set(steps) == {"copy", "revert", "reseed"}
    assert reseeded[0] == "announced", "the reseed phase is reported before the reseed"
    reseeded.pop(0)
    assert Path(machine.spec.root).read_bytes() == b"golden overlay"
    assert ("load_snapshot", golden.SNAPSHOT) in host.calls
    assert host.state(machine.name) == "running" and reseeded == [machine.spec.reseed_socket]


def test_reset_after_a_failed_restore_gives_a_fresh_overlay(images: dict[str, Any],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    host = FakeHost()
    machine = _machine(images, host)
    Path(machine.spec.root).write_bytes(b"half-copied golden overlay")
    asyncio.run(machine.boot(paused=True))
    machine.console.write_text("old console")
    asyncio.run(machine.reset())
    assert host.state(machine.name) == "missing"
    assert Path(machine.spec.root).read_bytes() == b"overlay"
    assert machine.console.read_bytes() == b""
    assert len(images["overlays"]) == 2


def test_destroy_closes_the_outbound_link_even_when_libvirt_fails(images: dict[str, Any]) -> None:
    host = FakeHost()
    machine = _machine(images, host)
    closed = []

    class Link:
        def close(self) -> None:
            closed.append(True)

    machine.outbound = Link()  # type: ignore[assignment]
    host.destroy_error = SandboxError("libvirtd went away")
    with pytest.raises(SandboxError):
        asyncio.run(machine.destroy())
    assert closed == [True]


def test_memory_rollback_gives_the_guest_fresh_random_bytes(images: dict[str, Any],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    host = FakeHost()
    machine = _machine(images, host)
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
        images: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    host = FakeHost()
    machine = _machine(images, host)
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
