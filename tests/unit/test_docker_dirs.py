"""The Docker kernel's shared directories, without an engine (seconds): modes, owners, and
what the host does with links and sockets a kernel planted there."""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
from pathlib import Path
from typing import Iterator

import pytest

from sandbox_kernels.runtimes.docker.dirs import CONNECTION_FILE, KernelDirs, release_ipc, remove_tree

SANDBOX = (1000, 1000)


@pytest.fixture
def dirs(tmp_path: Path) -> Iterator[KernelDirs]:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    kernel_dirs = KernelDirs(state, SANDBOX if os.geteuid() == 0 else None)
    yield kernel_dirs
    release_ipc(kernel_dirs.ipc)  # a root server's ipc/ is a mount


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim"
    path.write_text("host file\n")
    os.chmod(path, 0o600)
    return path


def test_layout_modes_and_owners(dirs: KernelDirs) -> None:
    dirs.prepare({"key": "k", "transport": "ipc"})
    ipc, conf = os.lstat(dirs.ipc), os.lstat(dirs.conf)
    cf = os.lstat(dirs.conf / CONNECTION_FILE)
    assert stat.S_IMODE(ipc.st_mode) == 0o700 and stat.S_IMODE(os.lstat(dirs.state_dir).st_mode) == 0o700
    if os.geteuid() == 0:
        assert (ipc.st_uid, ipc.st_gid) == SANDBOX
        assert (conf.st_uid, conf.st_gid, stat.S_IMODE(conf.st_mode)) == (0, SANDBOX[1], 0o750)
        assert (cf.st_uid, cf.st_gid, stat.S_IMODE(cf.st_mode)) == (0, SANDBOX[1], 0o640)
    assert json.loads((dirs.conf / CONNECTION_FILE).read_text())["key"] == "k"
    assert sorted(os.listdir(dirs.conf)) == [CONNECTION_FILE], "no temporary file left"
    assert set(dirs.volumes()[str(dirs.conf)].values()) == {str(dirs.conf), "ro"}
    assert set(dirs.volumes()) == {str(dirs.ipc), str(dirs.conf)}, "the state dir itself is not mounted"


def test_planted_links_are_replaced_not_followed(dirs: KernelDirs, victim: Path) -> None:
    dirs.prepare({"key": "1"})
    # Whatever was planted in ipc/ goes with the directory; a link in conf/ is replaced.
    os.symlink(victim, dirs.ipc / "k-1")
    os.symlink(victim.parent, dirs.ipc / "sub")
    try:
        os.link(victim, dirs.ipc / "hard")
    except OSError as e:  # a root server's ipc/ is a tmpfs of its own: no links into it
        assert e.errno == errno.EXDEV and os.path.ismount(dirs.ipc)
    os.mkfifo(dirs.ipc / "fifo")
    (dirs.conf / CONNECTION_FILE).unlink()
    os.symlink(victim, dirs.conf / CONNECTION_FILE)
    dirs.prepare({"key": "2"})
    assert victim.read_text() == "host file\n" and stat.S_IMODE(victim.stat().st_mode) == 0o600
    assert victim.stat().st_uid == os.geteuid() and victim.stat().st_nlink == 1
    assert os.listdir(dirs.ipc) == []
    assert not (dirs.conf / CONNECTION_FILE).is_symlink()
    assert json.loads((dirs.conf / CONNECTION_FILE).read_text())["key"] == "2"
    assert sorted(os.listdir(dirs.state_dir)) == ["conf", "ipc"], "the old ipc directory is gone"


def test_only_real_sockets_count_as_bound(dirs: KernelDirs, tmp_path: Path) -> None:
    dirs.prepare({})
    prefix = str(dirs.ipc / "k")
    elsewhere = socket.socket(socket.AF_UNIX)
    elsewhere.bind(str(tmp_path / "real.sock"))
    try:
        os.symlink(tmp_path / "real.sock", f"{prefix}-1")
        (dirs.ipc / "k-2").write_text("")
        assert not dirs.sockets_bound(prefix, [1]), "a symlink to a socket must not count"
        assert not dirs.sockets_bound(prefix, [2])
        own = socket.socket(socket.AF_UNIX)
        own.bind(f"{prefix}-3")
        try:
            assert dirs.sockets_bound(prefix, [3])
        finally:
            own.close()
    finally:
        elsewhere.close()


def test_remove_tree_follows_nothing(tmp_path: Path, victim: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    os.symlink(victim, tree / "a" / "link")
    os.symlink(victim.parent, tree / "a" / "dirlink")
    os.chmod(tree / "a" / "b", 0)
    remove_tree(tree)
    assert not tree.exists() and victim.read_text() == "host file\n"
    assert os.path.isdir(victim.parent)


def test_root_ipc_is_a_small_tmpfs_without_symlinks(dirs: KernelDirs, victim: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("the ipc tmpfs is a root server's; CI runs as root")
    dirs.prepare({})
    assert os.path.ismount(dirs.ipc)
    options = [line.split() for line in open("/proc/self/mountinfo") if line.split()[4] == str(dirs.ipc)]
    assert options and "nosymfollow" in " ".join(options[0]), options
    os.symlink(victim, dirs.ipc / "k-1")
    with pytest.raises(OSError) as info:
        open(dirs.ipc / "k-1").read()
    assert info.value.errno == errno.ELOOP
    with pytest.raises(OSError) as info:
        with open(dirs.ipc / "fill", "wb") as f:
            f.write(b"x" * (2 << 20))
    assert info.value.errno == errno.ENOSPC
    release_ipc(dirs.ipc)
    assert not os.path.lexists(dirs.ipc) and not os.path.ismount(dirs.ipc)
