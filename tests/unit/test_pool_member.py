"""A real pool member and a real claim over the fake runtime (no engine, no agent): what the
provisioner base does to hand a running sandbox over (``detach``) and take it (``adopt``)."""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.manager import AsyncKernelManager
from traitlets.config import Config

from helpers.fakes import FAKE_KERNEL, FakeRuntime, FakeWorld, calls_since, write_fake_kernelspec
from sandbox_kernels import labels
from sandbox_kernels.errors import SandboxStartError
from sandbox_kernels.pool import claim as claim_module
from sandbox_kernels.pool.client import Claim
from sandbox_kernels.pool.member import Member
from sandbox_kernels.pool.recipe import recipe_for
from sandbox_kernels.provisioning import start_progress
from sandbox_kernels.provisioning.exit_cleanup import tracked

POOLED = Config({"FakeRuntime": {"pool_size": 1}})


@pytest.fixture
def pool_ready(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FakeRuntime, "supports_pool", True)


async def _member(ksm: Any, world: FakeWorld) -> Member:
    spec = ksm.get_kernel_spec(FAKE_KERNEL)
    probe = FakeRuntime(kernel_id="probe", kernel_spec=spec, parent=None, config=POOLED)
    probe.world = world
    member = Member(await recipe_for(probe, FAKE_KERNEL, {}), logging.getLogger("test-pool"))
    await member.start()
    return member


class OneMember:
    """Stands in for the agent's client: hands ``member`` over to the first claim, and records
    what the runtime had done when the claim's hold on refills was released."""

    def __init__(self, member: dict[str, Any] | None, world: FakeWorld | None = None) -> None:
        self.member = member
        self.world = world
        self.asked = 0
        self.released_after: list[list[str]] = []  # the runtime's calls at each release

    def __call__(self, state_root: Any = None, **kwargs: Any) -> OneMember:
        return self

    def claim(self, recipe: Any) -> Claim:
        self.asked += 1
        member, self.member = self.member, None
        client = self

        class Held(Claim):
            def release(self) -> None:
                if self.hold is not None and client.world is not None:
                    client.released_after.append(list(client.world.calls))
                super().release()

        ends = socket.socketpair()
        ends[1].close()  # the agent's end
        if member is None:
            ends[0].close()
        return Held(member, [], ends[0] if member else None)


async def test_a_member_is_a_kernel_started_the_normal_way(world: FakeWorld, tmp_path: Path,
                                                         pool_ready: None) -> None:
    member = await _member(write_fake_kernelspec(tmp_path), world)
    try:
        prov = member.km.provisioner
        assert prov.pool_member and prov.sandbox_id == member.id == member.km.kernel_id
        assert prov.labels[labels.POOLED] == "1" and prov.sandbox_name == f"sandbox-kernels-{member.id}"
        assert world.calls[:3] == ["create_sandbox", "start_kernel", "wait_ready"]
        assert world.sandboxes == {prov.sandbox_name}
    finally:
        await member.destroy()
        await member.destroy()  # idempotent
    assert not world.sandboxes


async def test_a_claim_adopts_the_running_sandbox(world: FakeWorld, tmp_path: Path, pool_ready: None,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    ksm = write_fake_kernelspec(tmp_path)
    member = await _member(ksm, world)
    sandbox = f"sandbox-kernels-{member.id}"
    info, fds = await member.hand_over()
    assert fds == [] and member.km.provisioner is None
    state_dir = Path(info["provisioner_info"]["state_dir"])
    assert state_dir.is_dir() and state_dir.name == member.id, "the state directory stays for the claimer"
    assert world.sandboxes == {sandbox} and world.running, "the hand-over stopped the sandbox"
    assert not [p for p in tracked() if p.sandbox_id == member.id], "the agent would tear it down at exit"
    client = OneMember(info, world)
    monkeypatch.setattr(claim_module, "PoolClient", client)
    seen: list[dict[str, Any]] = []
    start_progress.add_sink(seen.append)
    km = AsyncKernelManager(kernel_name=FAKE_KERNEL, kernel_spec_manager=ksm, config=POOLED)
    mark = len(world.calls)
    try:
        await km.start_kernel()
    finally:
        start_progress.remove_sink(seen.append)
    try:
        prov = km.provisioner
        assert client.asked == 1 and prov.sandbox_id == member.id != km.kernel_id
        assert prov.sandbox_name == sandbox and prov.state_dir == state_dir
        calls = list(calls_since(world, mark))
        assert calls == [f"load_runtime_state fake-{member.id}", "wait_ready"], "a claimed start creates nothing"
        assert km.session.key == info["connection"]["key"].encode()
        assert km.get_connection_info()["shell_port"] == info["local_ports"]["shell_port"]
        assert [e["phase"] for e in seen] == ["claimed", "connecting", "ready"]
        assert len(client.released_after) == 1 and client.released_after[0][-1] == "wait_ready", \
            "the pool's refills were let go before (or never after) the kernel was connected"
        assert await km.is_alive()
        await km.restart_kernel(now=True)  # a restart stays in the claimed sandbox
        assert world.sandboxes == {sandbox} and world.running
    finally:
        await km.shutdown_kernel(now=True)
    assert not world.sandboxes, "the claimed sandbox outlived its kernel"
    assert not state_dir.exists()


async def test_an_empty_pool_or_extra_arguments_start_cold(world: FakeWorld, tmp_path: Path,
                                                           pool_ready: None,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    ksm = write_fake_kernelspec(tmp_path)
    client = OneMember(None)
    monkeypatch.setattr(claim_module, "PoolClient", client)
    km = AsyncKernelManager(kernel_name=FAKE_KERNEL, kernel_spec_manager=ksm, config=POOLED)
    await km.start_kernel()
    try:
        assert client.asked == 1 and km.provisioner.sandbox_id == km.kernel_id
        assert world.calls[:3] == ["create_sandbox", "start_kernel", "wait_ready"]
    finally:
        await km.shutdown_kernel(now=True)
    km = AsyncKernelManager(kernel_name=FAKE_KERNEL, kernel_spec_manager=ksm, config=POOLED)
    await km.start_kernel(extra_arguments=["--matplotlib=inline"])
    try:
        assert client.asked == 1, "a start with extra arguments asked the pool"
    finally:
        await km.shutdown_kernel(now=True)


async def test_a_claimed_kernel_that_cannot_be_connected_lets_the_pool_refill(
        world: FakeWorld, tmp_path: Path, pool_ready: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The claim holds the pool's refills while it connects; a failed connect removes the
    sandbox and lets go of the hold (or the pool would wait out the agent's bound)."""
    ksm = write_fake_kernelspec(tmp_path)
    member = await _member(ksm, world)
    info, _ = await member.hand_over()
    client = OneMember(info, world)
    monkeypatch.setattr(claim_module, "PoolClient", client)
    world.fail["wait_ready"] = SandboxStartError("the claimed kernel went away")
    km = AsyncKernelManager(kernel_name=FAKE_KERNEL, kernel_spec_manager=ksm, config=POOLED)
    with pytest.raises(SandboxStartError, match="went away"):
        await km.start_kernel()
    assert len(client.released_after) == 1, "the failed claim never let the pool refill"
    assert not world.sandboxes, "the claimed sandbox outlived the failed start"
