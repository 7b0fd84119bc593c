"""``sandbox-kernels kernelspec create`` round trips on every runtime: create, start, execute, remove.

Each kernelspec is written into a Jupyter data directory of the test's own, started through
jupyter_client as JupyterLab or papermill would start it, asked to run a cell, checked for the
setting it was created with, and removed again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from jupyter_client.kernelspec import KernelSpecManager

from helpers.ssh_host import USER as SSH_USER, ssh_host
from lifecycle import run_cell, start
from sandbox_kernels.cli import main



@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "data"))
    return tmp_path / "data"


@pytest.fixture
def ssh_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    with ssh_host(tmp_path_factory.mktemp("sshd"), tag="ksrt") as env:
        yield env


def _docker(_: Any) -> tuple[list[str], Callable[[Any], None]]:
    def check(km: Any) -> None:
        assert km.provisioner.memory == "512m" and km.provisioner.cpus == 0.5
    return ["--memory", "512m", "--cpus", "0.5"], check


def _vm(_: Any) -> tuple[list[str], Callable[[Any], None]]:
    def check(km: Any) -> None:
        assert km.provisioner.memory_mb == 512 and km.provisioner.vcpus == 1
    return ["--memory", "512", "--cpus", "1"], check


def _k8s(request: pytest.FixtureRequest) -> tuple[list[str], Callable[[Any], None]]:
    request.getfixturevalue("k8s_cluster")

    def check(km: Any) -> None:
        assert km.provisioner.resources["limits"] == {"memory": "768Mi", "cpu": "1"}
    return ["--memory", "768Mi", "--cpus", "1"], check


def _ssh(request: pytest.FixtureRequest) -> tuple[list[str], Callable[[Any], None]]:
    env = request.getfixturevalue("ssh_env")
    target = f"{SSH_USER}@{env['SANDBOX_SSH_HOST']}:{env['SANDBOX_SSH_PORT']}"

    def check(km: Any) -> None:
        assert (km.provisioner.host, km.provisioner.port) == (env["SANDBOX_SSH_HOST"], int(env["SANDBOX_SSH_PORT"]))
    return ["--host", target, "--set", f"key_file={env['SANDBOX_SSH_KEY_FILE']}",
            "--set", f"known_hosts={env['SANDBOX_SSH_KNOWN_HOSTS']}"], check


@pytest.mark.parametrize("runtime, options", [
    pytest.param("docker", _docker, marks=pytest.mark.docker, id="docker"),
    pytest.param("vm", _vm, marks=pytest.mark.vm, id="vm"),
    pytest.param("k8s", _k8s, marks=pytest.mark.k8s, id="k8s"),
    pytest.param("ssh", _ssh, marks=pytest.mark.ssh, id="ssh"),
])
async def test_created_kernelspec_starts_executes_and_is_removed(
        runtime: str, options: Callable[..., Any], data_dir: Path, request: pytest.FixtureRequest) -> None:
    args, check = options(request)
    name = f"roundtrip-{runtime}"
    assert main(["kernelspec", "create", name, "--runtime", runtime, *args, "--user"]) == 0
    spec = json.loads((data_dir / "kernels" / name / "kernel.json").read_text())
    assert spec["display_name"].endswith(f"({name})")
    km, kc = await start(name, ksm=KernelSpecManager(), timeout=300)
    try:
        check(km)
        out = await run_cell(kc, "print(6 * 7)", timeout=240)
        assert out["stdout"] == "42\n", out
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)
    assert main(["kernelspec", "remove", name]) == 0
    assert not (data_dir / "kernels" / name).exists()
    assert name not in KernelSpecManager().find_kernel_specs()
