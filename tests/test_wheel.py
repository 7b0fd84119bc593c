"""The wheel is the product: built here, installed into a fresh venv on a PATH without node.

The JupyterLab panel ships prebuilt inside it and the server extension's config is enabled by
the installed ``etc/jupyter`` file, so ``jupyter labextension list`` and ``jupyter server
extension list`` show both enabled without any build step, and ``sandbox-kernels
install-kernelspecs --sys-prefix`` makes the kernels appear in ``jupyter kernelspec list``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _run(argv: list[str], env: dict[str, str], timeout: float = 900) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout + proc.stderr)  # no colours


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(REPO)],
         {**os.environ, "HATCH_JUPYTER_BUILDER_SKIP_NPM": "1"})
    (whl,) = out.glob("sandbox_kernels-*.whl")
    return whl


def test_wheel_installs_panel_server_extension_and_kernelspecs(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True, timeout=120)
    # A PATH with the fresh venv and a few system tools, and no node anywhere on it.
    tools = tmp_path / "tools"
    tools.mkdir()
    for tool in ("sh", "env", "uname", "cat", "ls", "id"):
        (tools / tool).symlink_to(shutil.which(tool))
    path = os.pathsep.join([str(venv / "bin"), str(tools)])
    env = {"PATH": path, "HOME": str(tmp_path / "home"), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    assert shutil.which("node", path=path) is None, "this test needs a PATH without node"
    _run([str(venv / "bin" / "pip"), "install", "-q", f"{wheel}[server]", "jupyterlab>=4.6,<5"], env)

    labext = _run([str(venv / "bin" / "jupyter"), "labextension", "list"], env)
    assert "sandbox-kernels-panel" in labext and "enabled" in labext.split("sandbox-kernels-panel")[1][:80], labext
    serverext = _run([str(venv / "bin" / "jupyter"), "server", "extension", "list"], env)
    assert "jupyter_server_ext enabled" in serverext, serverext
    assert "jupyter_server_ext  OK" in serverext or "jupyter_server_ext OK" in serverext, serverext

    _run([str(venv / "bin" / "sandbox-kernels"), "install-kernelspecs", "--sys-prefix"], env)
    kernels = _run([str(venv / "bin" / "jupyter"), "kernelspec", "list"], env)
    for name in ("sandbox-docker", "sandbox-nixos-vm", "sandbox-k8s", "sandbox-ssh"):
        assert name in kernels and str(venv) in kernels, kernels
