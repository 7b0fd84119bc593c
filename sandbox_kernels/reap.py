"""``sandbox-kernels reap``: find and remove sandboxes that no live process owns.

Everything we create carries owner labels (host and pid of the Jupyter server or papermill
process that started it). After a crash those processes are gone and their containers,
domains, overlays and state directories are orphans. ``reap`` lists them (dry run, the
default) or removes them (``--yes``). Sandboxes of live owners are never touched.
"""

from __future__ import annotations

import argparse
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import labels
from .cache import cache_dir
from .errors import SandboxError
from .settings import default_state_root


@dataclass
class Orphan:
    """One thing to remove."""

    kind: str
    name: str
    remove: Callable[[], None]


def _containers() -> list[Orphan]:
    from .runtimes.docker_engine import DockerEngine

    try:
        engine = DockerEngine(timeout=10)
    except SandboxError:
        return []
    found = []
    for row in engine.find():
        if not labels.owner_alive(row.get("Labels") or {}):
            cid = row["Id"]
            found.append(Orphan("container", f"{row['Names'][0].lstrip('/')} ({cid[:12]})",
                                lambda cid=cid: engine.remove(cid)))
    return found


def _domains() -> list[Orphan]:
    try:
        from .vm.libvirt_conn import LibvirtHost

        host = LibvirtHost()
        names = host.list_domains()
    except SandboxError:
        return []
    found = []
    for name in names:
        if not labels.owner_alive(host.labels(name)):
            found.append(Orphan("domain", name, lambda name=name: host.destroy(name)))
    return found


def _directories(live_kernels: set[str], min_age: float) -> list[Orphan]:
    found = []
    roots = [("state", Path(default_state_root())), ("overlay", cache_dir() / "ephemeral")]
    for kind, root in roots:  # orphans' files go once their domain or container is gone
        if not root.is_dir():
            continue
        for entry in root.iterdir():
            # A kernel being created has files before its domain or socket exists: spare
            # anything younger than min_age.
            if entry.is_dir() and entry.name not in live_kernels and _age(entry) >= min_age:
                found.append(Orphan(kind, str(entry), lambda p=entry: shutil.rmtree(p, ignore_errors=True)))
    return found


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def find_orphans(min_age: float = 600.0) -> list[Orphan]:
    """Orphaned containers, domains, overlays and state directories on this host.

    A directory is kept while its kernel's control socket answers or any domain or container
    for its kernel id still exists (an orphaned one is reaped first, then its files).
    """
    orphans = _containers() + _domains()
    orphans += _directories(_live_kernels() | _existing_sandbox_ids(), min_age)
    return orphans


def _existing_sandbox_ids() -> set[str]:
    ids: set[str] = set()
    try:
        from .runtimes.docker_engine import DockerEngine

        engine = DockerEngine(timeout=10)
        ids |= {(row.get("Labels") or {}).get(labels.KERNEL_ID, "") for row in engine.find()}
    except SandboxError:
        pass
    try:
        from .vm.libvirt_conn import LibvirtHost

        ids |= {name[len(labels.DOMAIN_PREFIX):] for name in LibvirtHost().list_domains()}
    except SandboxError:
        pass
    return ids


def _live_kernels() -> set[str]:
    """Kernel ids whose sandbox still has a live owner (their directories stay)."""
    live: set[str] = set()
    root = Path(default_state_root())
    if root.is_dir():
        for entry in root.iterdir():
            sock = entry / "control.sock"
            if sock.exists() and _socket_answers(sock):
                live.add(entry.name)
    return live


def _socket_answers(path: Path) -> bool:
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(2)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def _run(args: argparse.Namespace) -> int:
    orphans = find_orphans(args.min_age)
    if not orphans:
        print("nothing to reap")
        return 0
    for orphan in orphans:
        if args.yes:
            try:
                orphan.remove()
                print(f"removed {orphan.kind} {orphan.name}")
            except SandboxError as e:
                print(f"could not remove {orphan.kind} {orphan.name}: {e}")
        else:
            print(f"would remove {orphan.kind} {orphan.name}")
    if not args.yes:
        print("dry run: add --yes to remove them (files of orphaned VMs and containers too)")
        return 0
    for orphan in find_orphans(args.min_age):  # files freed by removing their domain or container
        orphan.remove()
        print(f"removed {orphan.kind} {orphan.name}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register the ``reap`` sub-command."""
    p = sub.add_parser("reap", help="remove sandboxes whose owning process is gone (dry run by default)")
    p.add_argument("--yes", action="store_true", help="really remove them")
    p.add_argument("--min-age", type=float, default=600.0, metavar="SECONDS",
                   help="spare directories younger than this (a kernel may be starting); default 600")
    p.set_defaults(func=_run)
