"""Directories and files of the server's own: what another local user could have planted is
refused, and private files are 0600 from their first byte."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sandbox_kernels import private_dirs
from sandbox_kernels.errors import SandboxConfigError, SandboxUnavailable
from sandbox_kernels.private_dirs import open_private_dir, write_private_file

NOBODY = 65534


def _open(path: Path) -> int:
    fd = open_private_dir(path, "the state directory", "Pick another.")
    os.close(fd)
    return (path.stat().st_mode & 0o777)


def test_created_private_and_tightened(tmp_path: Path) -> None:
    assert _open(tmp_path / "a" / "b") == 0o700
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o750)
    os.chmod(loose, 0o750)
    assert _open(loose) == 0o700


def test_another_users_directory_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root to plant another user's directory (CI runs as root)")
    planted = tmp_path / "planted"
    planted.mkdir(mode=0o700)
    os.chown(planted, NOBODY, NOBODY)
    with pytest.raises(SandboxUnavailable, match=f"uid {NOBODY}.*Pick another"):
        _open(planted)


def test_a_link_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(SandboxUnavailable, match="not a link"):
        _open(tmp_path / "link")


def test_a_parent_others_can_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # no sticky bit: anyone may rename what is inside
    with pytest.raises(SandboxUnavailable, match="another user can change"):
        _open(shared / "state")
    os.chmod(shared, 0o1777)
    os.chown(shared, NOBODY, NOBODY)
    with pytest.raises(SandboxUnavailable, match="another user can change"):
        _open(shared / "state2")  # sticky, but another user's: its owner may still rename


def test_below_the_sticky_tmp(tmp_path: Path) -> None:
    assert _open(tmp_path / "under-tmp") == 0o700  # /tmp is root's and sticky


def test_a_private_file_is_0600_replaces_an_open_file_and_refuses_a_link(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_bytes(b"an older, longer content")
    path.chmod(0o644)
    assert write_private_file(path, b"secret", "key file") == path
    assert (path.read_bytes(), path.stat().st_mode & 0o777) == (b"secret", 0o600)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(SandboxConfigError, match=f"cannot write the seed disk {link}"):
        write_private_file(link, b"secret", "the seed disk")
    assert not (tmp_path / "elsewhere").exists()


def test_every_byte_is_written_when_a_write_is_short(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write
    monkeypatch.setattr(private_dirs.os, "write", lambda fd, data: real_write(fd, bytes(data[:3])))
    path = write_private_file(tmp_path / "seed.img", b"0123456789", "the seed disk")
    assert path.read_bytes() == b"0123456789"


def test_directories_are_created_private_without_touching_the_umask(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The umask is process-wide: a set-and-restore from two threads at once can leave it
    changed for good (it once left a CI run's later tests at 077)."""
    def forbidden(mask: int) -> int:
        raise AssertionError(f"os.umask({mask:o}) called")

    monkeypatch.setattr(os, "umask", forbidden)
    fd = open_private_dir(tmp_path / "p" / "q" / "r", "the state directory", "Pick another.")
    os.close(fd)
    for path in (tmp_path / "p", tmp_path / "p" / "q", tmp_path / "p" / "q" / "r"):
        assert path.stat().st_mode & 0o777 == 0o700, path
