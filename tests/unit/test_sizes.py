"""Sizes: one parser for every size setting, and the ``snapshot_max_bytes`` trait that reads
it from the kernelspec, the Jupyter config or its environment variable."""

from __future__ import annotations

import pytest
from traitlets.config import Config

from helpers.fakes import FakeRuntime
from sandbox_kernels.errors import SandboxConfigError
from sandbox_kernels.settings import parse_size

MiB = 1024**2


@pytest.mark.parametrize("value, size", [
    ("512m", 512 * MiB), ("2g", 2048 * MiB), ("1.5GiB", 1536 * MiB), ("1073741824", 1024 * MiB),
    (" 10 k ", 10 * 1024), ("8MB", 8 * MiB), ("1t", 1024**4), (4096, 4096),
])
def test_parse_size_accepts(value: str | int, size: int) -> None:
    assert parse_size(value, "memory") == size


@pytest.mark.parametrize("value", ["lots", "-5g", "0", "0.0001k", "5 gigabytes", "1e9", "", 0, -1])
def test_parse_size_refuses_naming_the_setting(value: str | int) -> None:
    with pytest.raises(SandboxConfigError, match="disk_size"):
        parse_size(value, "disk_size")


def test_snapshot_max_bytes_from_each_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SANDBOX_KERNELS_SNAPSHOT_MAX_BYTES", raising=False)
    assert FakeRuntime(kernel_id="k1").snapshot_max_bytes == 10 * 1024**3
    admin = Config({"SandboxProvisioner": {"snapshot_max_bytes": "1g"}})
    assert FakeRuntime(kernel_id="k1", config=admin).snapshot_max_bytes == 1024 * MiB
    assert FakeRuntime(kernel_id="k1", config=admin, snapshot_max_bytes="512m").snapshot_max_bytes == 512 * MiB
    monkeypatch.setenv("SANDBOX_KERNELS_SNAPSHOT_MAX_BYTES", "8m")
    assert FakeRuntime(kernel_id="k1").snapshot_max_bytes == 8 * MiB


def test_a_kernelspec_may_not_raise_the_admins_bound() -> None:
    admin = Config({"SandboxProvisioner": {"snapshot_max_bytes": "1g"}})
    with pytest.raises(SandboxConfigError, match="snapshot_max_bytes"):
        FakeRuntime(kernel_id="k1", config=admin, snapshot_max_bytes="2g")


@pytest.mark.parametrize("where", ["env", "kernelspec"])
def test_a_bad_size_names_its_source(monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    if where == "env":
        monkeypatch.setenv("SANDBOX_KERNELS_SNAPSHOT_MAX_BYTES", "lots")
        with pytest.raises(SandboxConfigError, match="SANDBOX_KERNELS_SNAPSHOT_MAX_BYTES"):
            FakeRuntime(kernel_id="k1").snapshot_max_bytes
    else:
        with pytest.raises(SandboxConfigError, match="snapshot_max_bytes"):
            FakeRuntime(kernel_id="k1", snapshot_max_bytes="lots")
