"""Golden memory snapshots: a booted guest with ipykernel imported, to start new VMs from.

A golden snapshot is a qcow2 overlay of the base image holding one internal snapshot, with
memory, of a VM whose guest has booted, started sshd and the kernel preloader (which has
imported ipykernel), and then waited. A new kernel's VM starts by copying that overlay,
creating its domain paused, loading the snapshot into that domain's QEMU and resuming it:
the guest resumes where the golden VM stopped instead of booting
and importing. The clone is then made its own machine (fresh host key, client key, hostname,
clock and random seed) by the reseed step of the guest contract (``guest/sandbox-init``).

Files, one directory per key under ``cache_dir()/vm/golden/``::

    <key>/root.qcow2     the overlay with the internal snapshot ``SNAPSHOT``
    <key>/golden.json    the key's inputs, the snapshot XML and the preloader's pid

The key hashes everything a clone must share with its golden VM (see :func:`golden_key`):
change the base image, the guest kernel, memory, the command or its environment, and the
old snapshot no longer matches; ``sandbox-kernels vm golden`` builds the new one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...cache import cache_dir
from ...errors import SandboxStartError, SandboxTimeout

#: The internal snapshot's name, in the golden overlay and so in every clone's.
SNAPSHOT = "sandbox-kernels-golden"
#: Bumped when the domain XML or the reseed protocol changes: old snapshots stop matching.
FORMAT = 1


def golden_root() -> Path:
    """``cache_dir()/vm/golden``: where golden snapshots are kept."""
    return cache_dir() / "vm" / "golden"


def golden_key(inputs: dict[str, Any]) -> str:
    """A short hash of ``inputs`` (JSON-serialisable) and :data:`FORMAT`."""
    blob = json.dumps({"format": FORMAT, **inputs}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_identity(path: str) -> dict[str, Any]:
    """What identifies a file's content cheaply: resolved path, size and modification time."""
    real = os.path.realpath(path)
    st = os.stat(real)
    return {"path": real, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


@dataclass(frozen=True)
class Golden:
    """One golden snapshot on disk.

    Attributes:
        key: its key.
        root: the overlay holding the snapshot.
        snapshot_xml: libvirt's metadata of the snapshot, for the record (clones load the
            snapshot straight into their QEMU; libvirt never knows it).
        preloader_pid: the pid of the preloader in the guest, ready to fork kernels.
        created: Unix time it was made.
    """

    key: str
    root: Path
    snapshot_xml: str
    preloader_pid: int
    created: float


def load(key: str, root: Path | None = None) -> Golden | None:
    """The golden snapshot for ``key``, or None if there is none (or it is incomplete)."""
    directory = (root or golden_root()) / key
    try:
        meta = json.loads((directory / "golden.json").read_text())
    except (OSError, ValueError):
        return None
    overlay = directory / "root.qcow2"
    if not overlay.is_file() or meta.get("key") != key:
        return None
    return Golden(key, overlay, meta["snapshot_xml"], int(meta["preloader_pid"]), float(meta["created"]))


def save(key: str, overlay: Path, snapshot_xml: str, preloader_pid: int, inputs: dict[str, Any],
         root: Path | None = None) -> Golden:
    """Move ``overlay`` into the store as the golden snapshot of ``key`` (replacing any old one).

    The metadata file is written last: a half-saved snapshot is never loaded.
    """
    directory = (root or golden_root()) / key
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "golden.json").unlink(missing_ok=True)
    shutil.move(str(overlay), directory / "root.qcow2")
    created = time.time()
    meta = {"key": key, "inputs": inputs, "snapshot_xml": snapshot_xml,
            "preloader_pid": preloader_pid, "created": created}
    tmp = directory / "golden.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(directory / "golden.json")
    return Golden(key, directory / "root.qcow2", snapshot_xml, preloader_pid, created)


def remove(key: str, root: Path | None = None) -> None:
    """Delete the golden snapshot of ``key`` (missing is fine)."""
    shutil.rmtree((root or golden_root()) / key, ignore_errors=True)


def stale(key: str, root: Path | None = None) -> bool:
    """Whether the golden snapshot of ``key`` was made from files that have changed or gone
    (base image, guest kernel, initrd): no configuration can use it any more."""
    directory = (root or golden_root()) / key
    try:
        inputs = json.loads((directory / "golden.json").read_text())["inputs"]
    except (OSError, ValueError, KeyError):
        return True  # incomplete: a build that did not finish
    for name in ("base", "kernel", "initrd"):
        recorded = inputs.get(name)
        if not recorded:
            continue
        try:
            if file_identity(recorded["path"]) != recorded:
                return True
        except OSError:
            return True
    return False


def prune(root: Path | None = None) -> list[str]:
    """Delete the stale golden snapshots (see :func:`stale`); returns their keys."""
    base = root or golden_root()
    if not base.is_dir():
        return []
    gone = []
    for entry in sorted(base.iterdir()):
        if entry.is_dir() and stale(entry.name, base):
            shutil.rmtree(entry, ignore_errors=True)
            (base / f"{entry.name}.lock").unlink(missing_ok=True)
            gone.append(entry.name)
    return gone


@contextlib.contextmanager
def build_lock(key: str, root: Path | None = None) -> Iterator[None]:
    """Hold an exclusive lock for building ``key`` (a second builder waits, then finds it built)."""
    base = root or golden_root()
    base.mkdir(parents=True, exist_ok=True)
    with open(base / f"{key}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def copy_overlay(golden: Golden, dest: Path) -> None:
    """Copy the golden overlay to ``dest`` (mode 0600); it still backs onto the base image."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.copyfile(golden.root, tmp)
    os.chmod(tmp, 0o600)
    tmp.replace(dest)


def reseed(socket_path: str, timeout: float) -> float:
    """Tell a restored clone to take its own seed; returns the seconds it took.

    Raises:
        SandboxStartError: the guest answered that it could not (its reason is included).
        SandboxTimeout: no answer within ``timeout`` seconds.
    """
    started = time.monotonic()
    deadline = started + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        while True:
            try:
                sock.settimeout(max(0.1, deadline - time.monotonic()))
                sock.connect(socket_path)
                break
            except (FileNotFoundError, ConnectionRefusedError) as e:
                if time.monotonic() > deadline:
                    raise SandboxTimeout(f"the VM's reseed port {socket_path} did not open: {e}") from e
                time.sleep(0.05)
        sock.sendall(f"reseed {int(time.time())}\n".encode())
        answer = b""
        try:
            while not answer.endswith(b"\n") and len(answer) < 4096:  # the guest writes it
                sock.settimeout(max(0.1, deadline - time.monotonic()))
                chunk = sock.recv(256)
                if not chunk:
                    break
                answer += chunk
        except socket.timeout as e:
            raise SandboxTimeout(
                f"the restored VM did not answer the reseed request within {timeout:g} s") from e
    line = answer.decode(errors="replace").strip().splitlines()[-1:] or [""]
    if line[0] != "reseeded":
        raise SandboxStartError(f"the restored VM could not take its own keys: {line[0] or 'no answer'}")
    return time.monotonic() - started
