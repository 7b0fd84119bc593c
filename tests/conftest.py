"""Shared fixtures: real engines, temporary kernelspecs, and the leak check that fails the run.

Every test cleans up what it starts; the session fixture below then fails the run if anything
labelled as ours (containers, domains, overlays, state directories) is still there, and removes
it so one leak does not cascade into later runs.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from helpers.leaks import find_leaks, remove_leaks

pytest_plugins = ["pytest_jupyter.jupyter_server", "helpers.k8s", "helpers.phases"]

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    # One id per test session: labels everything this run creates (see helpers/leaks.py).
    session = os.environ.setdefault("SANDBOX_KERNELS_SESSION", uuid.uuid4().hex[:12])
    os.environ.setdefault("SANDBOX_KERNELS_STATE_DIR", f"/tmp/sandbox-kernels-test/{session}")
    # Guests boot under TCG here; on a loaded two-core machine that can take minutes.
    os.environ.setdefault("NIXOS_VM_SSH_READY_TIMEOUT", "240")
    # pytest-jupyter's jp_environ moves HOME: pin the image cache before it does.
    from sandbox_kernels.cache import cache_dir

    os.environ.setdefault("SANDBOX_KERNELS_CACHE", str(cache_dir()))


@pytest.fixture
def jp_env_jupyter_path() -> str:
    """Let test servers see the kernelspecs and labextension installed into .venv."""
    return str(Path(sys.prefix) / "share" / "jupyter")


@pytest.fixture(scope="session", autouse=True)
def nothing_leaked() -> Iterator[None]:
    """Fail the session if anything labelled as ours is left behind."""
    before = find_leaks()
    yield
    _stop_pool_agent()
    after = find_leaks()
    leaked = {kind: sorted(set(items) - set(before.get(kind, []))) for kind, items in after.items()}
    leaked = {k: v for k, v in leaked.items() if v}
    remove_leaks(leaked)
    shutil.rmtree(os.environ["SANDBOX_KERNELS_STATE_DIR"], ignore_errors=True)
    assert not leaked, f"tests left these behind: {json.dumps(leaked, indent=1)}"


@pytest.fixture(autouse=True)
def umask_unchanged() -> Iterator[None]:
    """Fail a test after which the process umask differs: it is process-wide, so a change
    leaks into every later test (a leaked 077 once made a mode check pass by accident)."""
    before = _umask()
    yield
    assert _umask() == before, f"the process umask changed from {before} to {_umask()}"


def _umask() -> str:
    """The umask, read without setting it (Linux 4.7+)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Umask:"):
            return line.split()[1]
    raise RuntimeError("no Umask line in /proc/self/status")


def _stop_pool_agent() -> None:
    """Stop the session state root's warm-pool agent if a test started one (a lab's or a
    kernel's start does): its pooled sandboxes go before the leak check looks, and its
    directory (socket, lock, log) is no kernel's state."""
    from sandbox_kernels.pool.cli import wait_stopped
    from sandbox_kernels.pool.client import PoolClient

    client = PoolClient(os.environ["SANDBOX_KERNELS_STATE_DIR"])
    if client.stop():
        wait_stopped(client.paths, 300)
    shutil.rmtree(client.paths.root, ignore_errors=True)


@pytest.fixture
def kernelspec_dir(tmp_path: Path) -> Any:
    """Write a variant of a shipped kernelspec with extra provisioner config; returns a factory."""

    def make(base: str, name: str | None = None, **config: Any) -> Path:
        spec = json.loads((REPO / "kernelspecs" / base / "kernel.json").read_text())
        spec["metadata"]["kernel_provisioner"]["config"].update(config)
        target = tmp_path / "kernels" / (name or f"{base}-variant")
        target.mkdir(parents=True, exist_ok=True)
        (target / "kernel.json").write_text(json.dumps(spec))
        return tmp_path / "kernels"

    return make
