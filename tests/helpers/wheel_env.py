"""The built wheel installed into a fresh venv, as a user or a JupyterHub admin would install it.

The venv lives in a world-readable directory with Debian's own Python (not the developer's, which
may sit under a private home), so a non-root single-user server can run from it. One per test
session; removed at its end.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[2]
SYSTEM_PYTHON = "/usr/bin/python3"


@dataclass(frozen=True)
class WheelVenv:
    wheel: Path
    venv: Path

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)


def run(argv: list[str], env: dict[str, str], timeout: float = 900) -> str:
    """Run ``argv``; fail with its output unless it exits 0; return its output without colours."""
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout + proc.stderr)


def bare_path(tmp: Path, venv: Path) -> str:
    """A PATH with the venv and a few system tools, and no node anywhere on it."""
    tools = tmp / "tools"
    tools.mkdir(exist_ok=True)
    for tool in ("sh", "env", "uname", "cat", "ls", "id"):
        if not (tools / tool).exists():
            (tools / tool).symlink_to(shutil.which(tool))
    return os.pathsep.join([str(venv / "bin"), str(tools)])


@pytest.fixture(scope="session")
def wheel_venv() -> Iterator[WheelVenv]:
    """``python -m build`` the wheel, and install it with [server] and jupyterlab into a new venv."""
    top = Path(tempfile.mkdtemp(prefix="sandbox-kernels-wheel-", dir="/tmp"))
    top.chmod(0o755)
    try:
        dist = top / "dist"
        run([sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(REPO)],
            {**os.environ, "HATCH_JUPYTER_BUILDER_SKIP_NPM": "1"})
        (wheel,) = dist.glob("sandbox_kernels-*.whl")
        venv = top / "venv"
        run([SYSTEM_PYTHON, "-m", "venv", str(venv)], dict(os.environ), timeout=120)
        env = {"PATH": bare_path(top, venv), "HOME": str(top), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        run([str(venv / "bin/pip"), "install", "-q", f"{wheel}[server]", "jupyterlab>=4.6,<5"], env)
        yield WheelVenv(wheel=wheel, venv=venv)
    finally:
        shutil.rmtree(top, ignore_errors=True)
