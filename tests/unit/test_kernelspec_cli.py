"""``sandbox-kernels kernelspec``: options become settings, checked by the provisioner's traits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sandbox_kernels.cli import main
from sandbox_kernels.errors import SandboxConfigError
from sandbox_kernels.kernelspec_cli import provisioner_config, runtime_for


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "data"))
    return tmp_path / "data"


def test_options_become_each_runtimes_settings() -> None:
    assert provisioner_config(runtime_for("docker"), memory="4g", cpus=2) == {"memory": "4g", "cpus": 2}
    assert provisioner_config(runtime_for("vm"), memory="4g", cpus=2) == {"memory_mb": 4096, "vcpus": 2}
    assert provisioner_config(runtime_for("k8s"), memory="4g", cpus=1.0) == {
        "resources": {"limits": {"memory": "4Gi", "cpu": "1"}}}
    assert provisioner_config(runtime_for("ssh"), host="me@example.org:2222") == {
        "user": "me", "host": "example.org", "port": 2222}
    assert provisioner_config(runtime_for("docker"), settings=["pids_limit=64", "read_only=true"]) == {
        "pids_limit": 64, "read_only": True}


@pytest.mark.parametrize("runtime, kwargs, word", [
    ("ssh", {"memory": "4g"}, "--memory"),
    ("docker", {"host": "h"}, "--host"),
    ("vm", {"cpus": 1.5}, "--cpus"),
    ("docker", {"settings": ["novalue"]}, "KEY=VALUE"),
    ("podman", {}, "--runtime"),
])
def test_bad_options_are_named(runtime: str, kwargs: dict, word: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(SandboxConfigError, match=word):
        provisioner_config(runtime_for(runtime), **kwargs)


def test_create_list_remove(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["kernelspec", "create", "big", "--runtime", "docker", "--memory", "4g", "--user"]) == 0
    spec = json.loads((data_dir / "kernels" / "big" / "kernel.json").read_text())
    assert spec["metadata"]["kernel_provisioner"] == {
        "provisioner_name": "sandbox-docker-provisioner", "config": {"memory": "4g"}}
    assert "papermill -k big" in capsys.readouterr().out
    assert main(["kernelspec", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["big"]["runtime"] == "docker" and listed["big"]["config"] == {"memory": "4g"}
    assert main(["kernelspec", "remove", "big"]) == 0
    assert not (data_dir / "kernels" / "big").exists()


@pytest.mark.parametrize("args, word", [
    (["--runtime", "docker", "--set", "network=host"], "network"),
    (["--runtime", "docker", "--memory", "lots"], "memory"),
    (["--runtime", "docker", "--set", "colour=blue"], "colour"),
    (["--runtime", "vm", "--set", "max_concurrent_vms=99"], "max_concurrent_vms"),
    (["--runtime", "vm", "--image", "/etc/passwd"], "base_image"),
])
def test_create_refuses_what_a_start_would(args: list[str], word: str, data_dir: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["kernelspec", "create", "bad", *args, "--user"]) == 2
    assert word in capsys.readouterr().err
    assert not (data_dir / "kernels" / "bad").exists()


def test_remove_leaves_other_kernelspecs_alone(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = data_dir / "kernels" / "python-other"
    other.mkdir(parents=True)
    (other / "kernel.json").write_text(json.dumps({"argv": ["python3"], "display_name": "x", "language": "python"}))
    assert main(["kernelspec", "remove", "python-other"]) == 2
    assert other.exists()
