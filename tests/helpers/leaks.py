"""Find and remove what this test session created: containers, domains, pods, state dirs.

Everything the session starts carries the label ``sandbox-kernels.session=<id>`` (from the
``SANDBOX_KERNELS_SESSION`` variable, inherited by papermill subprocesses too), so a test run
never mistakes another run's sandboxes for its own leaks. Each runtime's record says how its
leftovers are found (its :class:`~sandbox_kernels.reap.OrphanFinder`'s ``leaks``); this module
adds the state directories every runtime shares.
"""

from __future__ import annotations

import os
from pathlib import Path

from sandbox_kernels.reap import OrphanFinder, finders, remove_directory


def _session() -> str:
    return os.environ["SANDBOX_KERNELS_SESSION"]


def _finders() -> list[OrphanFinder]:
    """One per runtime record, with its settings as the environment gives them now (the k8s
    fixture, for one, points the Kubernetes settings at the test cluster while it runs)."""
    return finders()


def _state_entries() -> list[str]:
    root = Path(os.environ["SANDBOX_KERNELS_STATE_DIR"])
    return [str(p) for p in root.iterdir()] if root.is_dir() else []


def find_leaks() -> dict[str, list[str]]:
    """Everything of this session's that exists now, by kind."""
    found: dict[str, list[str]] = {"state": _state_entries()}
    for finder in _finders():
        for kind, items in finder.leaks(_session()).items():
            found[kind] = list(dict.fromkeys(found.get(kind, []) + items))  # runtimes may share an engine
    return found


def remove_leaks(leaks: dict[str, list[str]]) -> None:
    """Best-effort removal so one leak does not break later runs (the sandboxes first, then
    their state directories)."""
    found = _finders()
    for finder in found:
        finder.remove_leaks(leaks)
    for path in leaks.get("state", []):
        remove_directory(found, Path(path))  # a Docker kernel's ipc/ tmpfs is unmounted first
