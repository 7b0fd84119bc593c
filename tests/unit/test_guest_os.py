"""The guest OS named from the os-release record next to a VM image."""

from __future__ import annotations

from pathlib import Path

from sandbox_kernels.images.guest_os import guest_os, record_path


def test_debian_guest_says_it_is_not_nixos(tmp_path: Path) -> None:
    image = tmp_path / "debian-1.qcow2"
    record_path(image).write_text('PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\n')
    os_ = guest_os(image)
    assert os_.name == "Debian GNU/Linux 12 (bookworm)" and not os_.is_nixos
    assert "not NixOS" in os_.describe() and "images/nixos" in os_.describe()


def test_nixos_through_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "sandbox-nixos.os-release").write_text("NAME=NixOS\nID=nixos\nPRETTY_NAME='NixOS 24.05 (Uakari)'\n")
    (tmp_path / "sandbox-nixos.qcow2").write_bytes(b"")
    (tmp_path / "current.qcow2").symlink_to(tmp_path / "sandbox-nixos.qcow2")
    assert guest_os(tmp_path / "current.qcow2").describe() == "NixOS 24.05 (Uakari)"


def test_no_record_and_a_huge_one(tmp_path: Path) -> None:
    assert not guest_os(tmp_path / "x.qcow2").known
    record_path(tmp_path / "y.qcow2").write_text("PRETTY_NAME=" + "A" * (1 << 20) + "\n")
    assert len(guest_os(tmp_path / "y.qcow2").name) <= 120
