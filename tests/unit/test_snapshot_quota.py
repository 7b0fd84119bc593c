"""The snapshot quota in the service, and its operations on a named snapshot, with a fake runtime
(seconds; the Docker engine proof is in tests/hostile/test_docker.py)."""

from __future__ import annotations

import contextlib
from typing import Any, AsyncIterator

import pytest

from sandbox_kernels.errors import SandboxConfigError, SandboxNotFound, SandboxQuotaExceeded
from sandbox_kernels.snapshots.model import Capabilities, Snapshot
from sandbox_kernels.snapshots.service import SnapshotService


class FakeRuntime:
    """Takes snapshots of a given size; what a runtime's snapshot hooks look like."""

    runtime = "fake"
    kernel_id = "k1"

    def __init__(self, max_count: int, max_bytes: int, size: int | None) -> None:
        self.snapshot_max_count, self.snapshot_max_bytes, self.size = max_count, max_bytes, size
        self.snaps: list[Snapshot] = []

    @contextlib.asynccontextmanager
    async def busy(self) -> AsyncIterator[None]:
        yield

    def snapshot_capabilities(self) -> Capabilities:
        return Capabilities(kinds=["filesystem"], default_kind="filesystem", note="")

    async def snapshot_list(self) -> list[Snapshot]:
        return list(self.snaps)

    async def snapshot_create(self, name: str, kind: str, keep: bool) -> Snapshot:
        snap = Snapshot(name=name, kind=kind, size=self.size, keep=keep)
        self.snaps.append(snap)
        return snap

    async def snapshot_delete(self, snapshot: Snapshot) -> None:
        self.snaps.remove(snapshot)

    async def snapshot_rollback(self, snapshot: Snapshot) -> bool:
        self.rolled_back = snapshot.name
        return False  # the kernel lived on: nothing to settle


async def test_count_includes_kept_snapshots() -> None:
    fake: Any = FakeRuntime(max_count=2, max_bytes=1 << 30, size=10)
    service = SnapshotService(fake)
    await service.create("a", keep=True)
    await service.create("b")
    with pytest.raises(SandboxQuotaExceeded, match="snapshot_max_count=2") as info:
        await service.create("c")
    assert "SANDBOX_KERNELS_SNAPSHOT_MAX_COUNT" in str(info.value) and "kept snapshots count" in str(info.value)
    await service.delete("b")
    await service.create("c")
    assert [s.name for s in fake.snaps] == ["a", "c"]


async def test_a_snapshot_over_the_bytes_is_removed_again() -> None:
    fake: Any = FakeRuntime(max_count=10, max_bytes=25, size=10)
    service = SnapshotService(fake)
    await service.create("a")
    await service.create("b")
    with pytest.raises(SandboxQuotaExceeded, match="snapshot_max_bytes") as info:
        await service.create("c")
    assert "not kept" in str(info.value)
    assert [s.name for s in fake.snaps] == ["a", "b"]
    fake.snapshot_max_bytes = 20
    with pytest.raises(SandboxQuotaExceeded, match="snapshot_max_bytes"):  # full before it starts
        await service.create("d")


async def test_sizes_a_runtime_does_not_report_are_bound_by_count() -> None:
    fake: Any = FakeRuntime(max_count=1, max_bytes=1, size=None)
    service = SnapshotService(fake)
    await service.create("a")
    with pytest.raises(SandboxQuotaExceeded, match="snapshot_max_count=1"):
        await service.create("b")


def test_settings_from_the_environment_and_their_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    from sandbox_kernels.runtimes.docker.provisioner import DockerProvisioner

    monkeypatch.setenv("SANDBOX_KERNELS_SNAPSHOT_MAX_BYTES", "2g")
    monkeypatch.setenv("SANDBOX_KERNELS_SNAPSHOT_MAX_COUNT", "3")
    prov = DockerProvisioner(snapshot_max_bytes="1g")
    assert (prov.snapshot_max_count, prov.snapshot_max_bytes) == (3, 1 << 30)
    with pytest.raises(SandboxConfigError, match="snapshot_max_bytes"):  # a kernelspec may only lower it
        DockerProvisioner(snapshot_max_bytes="5g")
    with pytest.raises(SandboxConfigError, match="snapshot_max_count"):
        DockerProvisioner(snapshot_max_count=4)
    with pytest.raises(SandboxConfigError, match="snapshot_max_bytes"):
        DockerProvisioner(snapshot_max_bytes="lots")
    monkeypatch.setenv("SANDBOX_KERNELS_SNAPSHOT_MAX_COUNT", "many")
    with pytest.raises(SandboxConfigError, match="SANDBOX_KERNELS_SNAPSHOT_MAX_COUNT"):
        _ = DockerProvisioner().snapshot_max_count


async def test_rollback_and_delete_check_the_name_then_find_the_snapshot() -> None:
    fake: Any = FakeRuntime(max_count=10, max_bytes=1 << 30, size=10)
    service = SnapshotService(fake)
    await service.create("a")
    result = await service.rollback("a")
    assert (result.name, result.kind, result.kernel_restarted, fake.rolled_back) == ("a", "filesystem", False, "a")
    for operation in (service.rollback, service.delete):
        with pytest.raises(SandboxNotFound, match="kernel k1 has no snapshot named 'b'"):
            await operation("b")
        with pytest.raises(SandboxConfigError, match="snapshot name"):
            await operation("../a")
    await service.delete("a")
    assert fake.snaps == []
