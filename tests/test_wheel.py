"""The wheel is the product: built here, installed into a fresh venv on a PATH without node.

The JupyterLab panel ships prebuilt inside it and the server extension's config is enabled by
the installed ``etc/jupyter`` file, so ``jupyter labextension list`` and ``jupyter server
extension list`` show both enabled without any build step, and ``sandbox-kernels
install-kernelspecs --sys-prefix`` makes the kernels appear in ``jupyter kernelspec list``.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from sandbox_kernels.runtimes import registry

from helpers.wheel_env import WheelVenv, bare_path, run, wheel_venv  # noqa: F401 (fixture)


def test_wheel_installs_panel_server_extension_and_kernelspecs(wheel_venv: WheelVenv, tmp_path: Path) -> None:
    path = bare_path(tmp_path, wheel_venv.venv)
    env = {"PATH": path, "HOME": str(tmp_path / "home")}
    assert shutil.which("node", path=path) is None, "this test needs a PATH without node"

    labext = run([wheel_venv.bin("jupyter"), "labextension", "list"], env)
    assert "sandbox-kernels-panel" in labext and "enabled" in labext.split("sandbox-kernels-panel")[1][:80], labext
    serverext = run([wheel_venv.bin("jupyter"), "server", "extension", "list"], env)
    assert "jupyter_server_ext enabled" in serverext, serverext
    assert "jupyter_server_ext  OK" in serverext or "jupyter_server_ext OK" in serverext, serverext

    # The start-phase events' schema ships with the server extension and loads.
    proc = subprocess.run([wheel_venv.bin("python"), "-c", "from jupyter_events import EventLogger; "
                           "from jupyter_server_ext.events import SCHEMA_ID, register_schema; "
                           "logger = EventLogger(); register_schema(logger); "
                           "print(SCHEMA_ID in logger.schemas.schema_ids)"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "True", proc.stderr

    run([wheel_venv.bin("sandbox-kernels"), "install-kernelspecs", "--sys-prefix"], env)
    kernels = run([wheel_venv.bin("jupyter"), "kernelspec", "list"], env)
    # The wheel carries every runtime's record (its entry points) and every record's kernelspec.
    proc = subprocess.run([wheel_venv.bin("python"), "-c", "from sandbox_kernels.runtimes import registry; "
                           "print(' '.join(r.kernel_name for r in registry.records()))"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    shipped = proc.stdout.split()
    assert sorted(shipped) == sorted(r.kernel_name for r in registry.records()), shipped
    for name in shipped:
        assert name in kernels and str(wheel_venv.venv) in kernels, kernels
