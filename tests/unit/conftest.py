"""The unit layer: no engine, so nothing to find in one afterwards.

The session-wide leak check of ``tests/conftest.py`` asks Docker, libvirt and the cluster what
this run left behind; here nothing is created in them, and each unit test checks its own fakes.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from helpers.fakes import FakeWorld, use_fake_runtime


@pytest.fixture(scope="session", autouse=True)
def nothing_leaked() -> Iterator[None]:
    """Overrides the engine leak check for the unit layer (which starts no engine)."""
    yield


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeWorld]:
    """A fake engine for :class:`helpers.fakes.FakeRuntime`, and a private state root short
    enough for unix socket paths (pytest's tmp_path is not)."""
    state = Path(tempfile.mkdtemp(prefix="sk-unit-", dir="/tmp"))
    monkeypatch.setenv("SANDBOX_KERNELS_STATE_DIR", str(state))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    world = FakeWorld()
    use_fake_runtime(monkeypatch, world)
    try:
        yield world
    finally:
        shutil.rmtree(state, ignore_errors=True)
