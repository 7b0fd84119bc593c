"""Directories of the server's own: what another local user could have planted is refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sandbox_kernels.errors import SandboxUnavailable
from sandbox_kernels.private_dirs import open_private_dir

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
