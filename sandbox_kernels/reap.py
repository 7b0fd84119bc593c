"""``sandbox-kernels reap``: find and remove sandboxes that no live process owns.

Everything we create carries owner labels (host and pid of the Jupyter server or papermill
process that started it). After a crash those processes are gone and their containers,
domains, pods, overlays and state directories are orphans. ``reap`` lists them (dry run, the
default) or removes them (``--yes``). Sandboxes of live owners are never touched.

Each runtime says how its orphans are found (its record's :class:`OrphanFinder`, in
``runtimes/<name>/orphans.py``); this module iterates the records and adds what they share:
the per-kernel directories, which go once no sandbox and no live control socket needs them.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from .errors import SandboxError
from .pool.paths import AgentPaths
from .runtimes import registry

log = logging.getLogger(__name__)


@dataclass
class Orphan:
    """One thing to remove."""

    kind: str
    name: str
    remove: Callable[[], None]
    kernel_id: str = ""  # whose files may go as soon as this is removed


class OrphanFinder(ABC):
    """How one runtime's leftovers are found: orphans for ``reap``, leaks for the test session.

    Built with the runtime's settings (its provisioner, built from the admin's configuration,
    launching nothing). Every method is called off the event loop and returns nothing (rather
    than raising) when the runtime's engine does not answer.
    """

    def __init__(self, settings: Any) -> None:
        self.settings = settings

    @abstractmethod
    def orphans(self) -> list[Orphan]:
        """This host's sandboxes whose owner process is gone (called by ``reap``)."""

    @abstractmethod
    def existing(self) -> set[str]:
        """Kernel ids whose sandbox exists, whoever owns it: their directories stay."""

    def directories(self) -> list[tuple[str, Path]]:
        """``(kind, root)`` of per-kernel directories (``root/<kernel id>``) this runtime makes.

        Default: the state directories (``state_root``); extend it, calling ``super()``.
        """
        return [("state", Path(self.settings.state_root))]

    def release_directory(self, path: Path) -> None:
        """Undo what this runtime set up inside a kernel's directory ``path`` (Docker: its
        ``ipc/`` tmpfs) before :func:`remove_directory` removes it. Default: nothing."""

    @abstractmethod
    def leaks(self, session: str) -> dict[str, list[str]]:
        """What test session ``session`` (the ``sandbox-kernels.session`` label) left, by kind
        (called by the tests' leak check at the start and the end of a session)."""

    @abstractmethod
    def remove_leaks(self, leaks: dict[str, list[str]]) -> None:
        """Best-effort removal of the kinds of ``leaks`` that :meth:`leaks` reports."""


def finders(config: Any = None, **overrides: Any) -> list[OrphanFinder]:
    """One finder per runtime whose dependencies are installed, built from Jupyter ``config``.

    ``overrides`` set settings a record offers to ``reap`` (``namespace="x"``); empty values
    are ignored.
    """
    found = []
    for record in registry.records():
        try:
            settings = record.settings(config)
            for name in record.reap_options:
                if overrides.get(name):
                    setattr(settings, name, overrides[name])
            found.append(record.load("orphans")(settings))
        except SandboxError as e:
            log.debug("reap: skipping the %s runtime: %s", record.name, e)
    return found


def find_orphans(min_age: float = 600.0, config: Any = None, **overrides: Any) -> list[Orphan]:
    """Orphaned containers, domains, pods, overlays and state directories of this host.

    A directory is kept while its kernel's control socket answers or any sandbox for its
    kernel id still exists (an orphaned one is reaped first, then its files). ``config`` is
    the admin's Jupyter configuration; ``overrides`` are the ``reap`` command's options (for
    example the Kubernetes ``namespace`` and ``kubeconfig``; their defaults are the settings').
    """
    found = finders(config, **overrides)
    orphans = _unique(orphan for finder in found for orphan in _ask(finder, "orphans", []))
    orphans += _directories(found, _live_kernels(found) | _existing(found), min_age)
    return orphans


def reap(min_age: float = 600.0, config: Any = None, **overrides: Any) -> list[str]:
    """Remove every orphan (then the files that removal freed); return what was removed.

    Errors removing one orphan are reported in the list and do not stop the others.
    """
    done, reaped = [], set()
    for orphan in find_orphans(min_age, config, **overrides):
        try:
            orphan.remove()
            done.append(f"removed {orphan.kind} {orphan.name}")
            if orphan.kernel_id:
                reaped.add(orphan.kernel_id)
        except SandboxError as e:
            done.append(f"could not remove {orphan.kind} {orphan.name}: {e}")
    # The files of the sandboxes just removed (and any others old enough) go now.
    found = finders(config, **overrides)
    for orphan in _directories(found, _live_kernels(found) | _existing(found), min_age, reaped):
        orphan.remove()
        done.append(f"removed {orphan.kind} {orphan.name}")
    return done


def remove_directory(found: list[OrphanFinder], path: Path) -> None:
    """Remove a kernel's directory that a dead process left, once every runtime released it."""
    for finder in found:
        finder.release_directory(path)
    shutil.rmtree(path, ignore_errors=True)


def _ask(finder: OrphanFinder, method: str, default: Any) -> Any:
    """``finder.<method>()``, or ``default`` when the runtime's settings are invalid (one
    runtime's bad environment variable must not stop the others' reaping)."""
    try:
        return getattr(finder, method)()
    except SandboxError as e:
        log.warning("reap: the %s finder: %s", type(finder).__name__, e)
        return default


def _unique(orphans: Iterable[Orphan]) -> list[Orphan]:
    """Drop repeats (two runtimes may share an engine, e.g. a Docker runtime variant)."""
    seen, unique = set(), []
    for orphan in orphans:
        if (orphan.kind, orphan.name) not in seen:
            seen.add((orphan.kind, orphan.name))
            unique.append(orphan)
    return unique


def _roots(found: list[OrphanFinder]) -> list[tuple[str, Path]]:
    return list(dict.fromkeys(root for finder in found for root in _ask(finder, "directories", [])))


def _directories(found: list[OrphanFinder], live_kernels: set[str], min_age: float,
                 orphaned: frozenset[str] | set[str] = frozenset()) -> list[Orphan]:
    """State and overlay directories of kernels that are not live.

    Those of ``orphaned`` kernels (whose sandbox was just reaped) go at once; others only
    once older than ``min_age``.
    """
    result = []
    for kind, root in _roots(found):  # orphans' files go once their domain or container is gone
        if not root.is_dir():
            continue
        agent_dir = AgentPaths.for_state_root(str(root)).root  # the pool agent's socket and lock
        for entry in root.iterdir():
            if entry == agent_dir:
                continue
            # A kernel being created has files before its domain or socket exists: spare
            # anything younger than min_age.
            old_enough = entry.name in orphaned or _age(entry) >= min_age
            if entry.is_dir() and entry.name not in live_kernels and old_enough:
                result.append(Orphan(kind, str(entry), lambda p=entry: remove_directory(found, p)))
    return result


def _existing(found: list[OrphanFinder]) -> set[str]:
    ids: set[str] = set()
    for finder in found:
        ids |= _ask(finder, "existing", set())
    return ids


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _live_kernels(found: list[OrphanFinder]) -> set[str]:
    """Kernel ids whose sandbox still has a live owner (their directories stay)."""
    live: set[str] = set()
    for kind, root in _roots(found):
        if kind != "state" or not root.is_dir():
            continue
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
    overrides = {name: getattr(args, name) for record in registry.records() for name in record.reap_options}
    orphans = find_orphans(args.min_age, **overrides)
    if not orphans:
        print("nothing to reap")
        return 0
    if args.yes:
        for line in reap(args.min_age, **overrides):
            print(line)
        return 0
    for orphan in orphans:
        print(f"would remove {orphan.kind} {orphan.name}")
    print("dry run: add --yes to remove them (files of orphaned VMs and containers too)")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register the ``reap`` sub-command (with the options the runtimes' records offer)."""
    p = sub.add_parser("reap", help="remove sandboxes whose owning process is gone (dry run by default)")
    p.add_argument("--yes", action="store_true", help="really remove them")
    p.add_argument("--min-age", type=float, default=600.0, metavar="SECONDS",
                   help="spare directories younger than this (a kernel may be starting); default 600")
    offered: set[str] = set()
    for record in registry.records():
        for name, help_text in record.reap_options.items():
            if name not in offered:
                offered.add(name)
                p.add_argument(f"--{name.replace('_', '-')}", dest=name, default="", help=help_text)
    p.set_defaults(func=_run)
