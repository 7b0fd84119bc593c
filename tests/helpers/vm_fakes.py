"""Fakes of the VM runtime's engine parts for unit tests: a libvirt connection (:class:`FakeHost`)
and, installed by :func:`fake_images`, a base image, a guest kernel, qemu-img, the accelerator
probe and the ACL grants. The engine suites (tests/test_vm*.py) prove the real parts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sandbox_kernels.runtimes.vm import machine as machine_mod
from sandbox_kernels.runtimes.vm.accel import AccelChoice


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
