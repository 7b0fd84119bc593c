"""The pool agent and its warm pools over fake members (no engine): claims are atomic, stale
and idle pools are drained, a waiting VM start gets a slot back, refills retry."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import pytest

from helpers.pool import FakeMembers, until
from sandbox_kernels.errors import SandboxError, SandboxStartError
from sandbox_kernels.pool import agent as agent_module
from sandbox_kernels.pool import protocol
from sandbox_kernels.pool import warm_pool
from sandbox_kernels.pool.agent import Agent
from sandbox_kernels.pool.client import PoolClient
from sandbox_kernels.pool.paths import AgentPaths
from sandbox_kernels.pool.recipe import Recipe
from sandbox_kernels.pool.warm_pool import SlotBusy, WarmPool

LOG = logging.getLogger("test-pool")


def recipe(size: int = 2, memory: str = "1g", runtime: str = "docker", kernel: str = "sandbox-docker",
           idle: float = 600.0) -> Recipe:
    return Recipe(provisioner_class="x:Fake", kernel_name=kernel, spec={"argv": ["python3"]},
                  settings={"memory": memory, "pool_size": size, "pool_idle_timeout": idle},
                  env={}, identity={}, runtime=runtime)


def claim(r: Recipe) -> dict[str, Any]:
    return {"op": "claim", "recipe": r.to_dict()}


@pytest.fixture
def members(monkeypatch: pytest.MonkeyPatch, state_root: Path) -> FakeMembers:
    fake = FakeMembers()
    fake.state_root = state_root
    monkeypatch.setattr(warm_pool, "Member", fake.member_class())
    monkeypatch.setattr(warm_pool, "RETRY_FIRST", 0.01)
    return fake


@pytest.fixture
def state_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="skp-unit-", dir="/tmp"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def agent(state_root: Path) -> Agent:
    """An agent whose requests a test hands in directly (:meth:`Agent.handle`); each such
    test drains it at its end (fake members hold nothing outside the test's loop)."""
    return Agent(AgentPaths.for_state_root(str(state_root)))


async def _filled(agent: Agent, r: Recipe) -> WarmPool:
    pool = agent.want(r)
    await until(lambda: len(pool.ready) >= r.target and pool.starting is None, what="the pool to fill")
    return pool


def _closed(write_end: int, read_end: int) -> bool:
    """Whether ``write_end`` no longer is that pipe's (closed, or its number reused)."""
    try:
        return os.fstat(write_end).st_ino != os.fstat(read_end).st_ino
    except OSError:
        return True


@contextlib.asynccontextmanager
async def serving(state_root: Path, r: Recipe) -> AsyncIterator[tuple[Agent, asyncio.Future[None]]]:
    """An agent serving its socket with ``r``'s pool wanted; its run is cancelled at the end if
    the test did not stop it."""
    agent = Agent(AgentPaths.for_state_root(str(state_root)))
    assert agent.take_lock()
    run = asyncio.ensure_future(agent.run(r))
    try:
        await until(lambda: agent.paths.socket.exists() and r.key() in agent.pools, what="the agent")
        yield agent, run
    finally:
        run.cancel()


async def test_a_ready_member_is_handed_out_once(agent: Agent, members: FakeMembers) -> None:
    r = recipe(size=2)
    first, _ = await agent.handle(claim(r))
    assert first == {"member": None}, "an empty pool hands nothing out (and starts filling)"
    pool = await _filled(agent, r)
    ready_ids = [m.id for m in pool.ready]
    reply, fds = await agent.handle(claim(r))
    assert reply["member"]["id"] == ready_ids[0] and fds == []
    handed = next(m for m in members.made if m.id == ready_ids[0])
    assert handed.handed_over == 1 and handed not in pool.ready and not handed.destroyed
    for _ in range(6):  # it never comes back, however often one asks (and the pool refills)
        reply, _ = await agent.handle(claim(r))
        assert (reply["member"] or {}).get("id") != handed.id
    assert handed.handed_over == 1
    await agent.drain_all()


async def test_a_member_that_died_waiting_is_removed_not_handed_out(agent: Agent, members: FakeMembers) -> None:
    r = recipe(size=2)
    pool = await _filled(agent, r)
    dead, alive = pool.ready
    dead.dead = True
    reply, _ = await agent.handle(claim(r))
    assert reply["member"]["id"] == alive.id
    assert dead.destroyed and not dead.handed_over
    await agent.drain_all()


async def test_concurrent_claims_never_share_a_member(agent: Agent, members: FakeMembers) -> None:
    r = recipe(size=4)
    await _filled(agent, r)
    replies = await asyncio.gather(*(agent.handle(claim(r)) for _ in range(16)))
    ids = [reply["member"]["id"] for reply, _ in replies if reply["member"]]
    assert len(ids) >= 4, "every ready member should have been claimed"
    assert len(ids) == len(set(ids)), f"a member was given to two claims: {ids}"
    assert all(m.handed_over <= 1 for m in members.made)
    pool = agent.pools[r.key()]
    assert not {m.id for m in pool.ready} & set(ids), "a claimed member is still in the pool"
    await agent.drain_all()


async def test_a_new_configuration_drains_the_stale_pool(agent: Agent, members: FakeMembers) -> None:
    old = await _filled(agent, recipe(size=2, memory="1g"))
    old_members = list(old.ready)
    other_kernel = await _filled(agent, recipe(size=1, kernel="other-kernel"))
    reply, _ = await agent.handle(claim(recipe(size=2, memory="2g")))
    assert reply == {"member": None}, "the new configuration's pool starts empty"
    assert old.key not in agent.pools and recipe(memory="2g").key() in agent.pools
    await until(lambda: all(m.destroyed for m in old_members), what="the stale members' removal")
    assert old.ready == [] and not any(m.handed_over for m in old_members)
    assert other_kernel.key in agent.pools and not any(m.destroyed for m in other_kernel.ready), \
        "another kernelspec's pool is not stale"
    await _filled(agent, recipe(size=2, memory="2g"))
    await agent.drain_all()


async def test_an_idle_pool_is_drained_and_the_agent_exits(state_root: Path, members: FakeMembers,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent_module, "CHECK_EVERY", 0.01)
    agent = Agent(AgentPaths.for_state_root(str(state_root)))
    assert agent.take_lock()
    r = recipe(size=2)
    run = asyncio.ensure_future(agent.run(r))
    try:
        await until(lambda: r.key() in agent.pools, what="the first pool")
        pool = await _filled(agent, r)
        assert not run.done()
        kept = list(pool.ready)
        pool.last_wanted -= r.idle_timeout + 1  # nobody asked for longer than pool_idle_timeout
        await asyncio.wait_for(run, 10)
        assert all(m.destroyed for m in kept) and agent.pools == {}
        assert not agent.paths.socket.exists()
    finally:
        run.cancel()


async def test_yield_slot_shrinks_a_vm_pool_only(agent: Agent, members: FakeMembers) -> None:
    docker = await _filled(agent, recipe(size=1))
    vm = await _filled(agent, recipe(size=2, runtime="libvirt", kernel="sandbox-nixos-vm"))
    given = vm.ready[-1]
    reply, _ = await agent.handle({"op": "yield_slot"})
    assert reply == {"removed": 1}
    assert given.destroyed and len(vm.ready) == 1 and len(docker.ready) == 1
    # Refills pause under pressure: the pool stays shrunk rather than take the slot again.
    assert vm.starting is None and len(vm.ready) == 1
    reply, _ = await agent.handle({"op": "yield_slot"})
    assert reply == {"removed": 1} and vm.ready == []
    reply, _ = await agent.handle({"op": "yield_slot"})
    assert reply == {"removed": 0}, "nothing left to give back"
    assert not any(m.destroyed for m in docker.ready)
    await agent.drain_all()


async def test_yield_slot_gives_a_starting_member_up_first(agent: Agent, members: FakeMembers) -> None:
    r = recipe(size=2, runtime="libvirt", kernel="sandbox-nixos-vm")
    vm = await _filled(agent, recipe(size=1, runtime="libvirt", kernel="sandbox-nixos-vm"))
    ready = vm.ready[0]
    members.hold()
    agent.want(r)  # one more wanted: a member starts (and waits at the gate)
    await until(lambda: vm.starting is not None, what="a member to start")
    starting = vm.starting
    reply, _ = await agent.handle({"op": "yield_slot"})
    assert reply == {"removed": 1}
    assert starting.destroyed and not starting.started, "the starting member was given up"
    assert not ready.destroyed and vm.ready == [ready], "the ready member stays"
    members.release()
    await agent.drain_all()


async def test_refill_retries_after_a_failed_start(agent: Agent, members: FakeMembers) -> None:
    members.failures = [SandboxStartError("no image"), OSError("disk full")]
    pool = agent.want(recipe(size=1))
    await until(lambda: len(pool.ready) == 1, what="a member after two failures")
    assert len(members.made) == 3 and [m.destroyed for m in members.made] == [True, True, False]
    assert pool.last_error == "" and len(pool.refill_seconds) == 1
    status = await pool.status()
    assert status["ready"] == 1 and status["memory_bytes"] == 1 << 20 and status["members"] == [pool.ready[0].id]
    await agent.drain_all()


async def test_a_failing_refill_reports_its_error(agent: Agent, members: FakeMembers,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    members.failures = [SandboxStartError("the image is broken")] * 1000
    pool = agent.want(recipe(size=1))
    await until(lambda: pool.last_error == "the image is broken", what="the error in the status")
    assert (await pool.status())["last_error"] == "the image is broken"
    members.failures.clear()
    await until(lambda: len(pool.ready) == 1, timeout=30, what="recovery")
    assert pool.last_error == ""
    await agent.drain_all()


async def test_slot_busy_is_no_error_and_is_retried(agent: Agent, members: FakeMembers) -> None:
    members.failures = [SlotBusy("no free VM slot"), SlotBusy("no free VM slot")]
    pool = agent.want(recipe(size=1, runtime="libvirt", kernel="sandbox-nixos-vm"))
    await until(lambda: len(pool.ready) == 1, what="a member once a slot is free")
    assert pool.last_error == "" and [m.destroyed for m in members.made] == [True, True, False]
    await agent.drain_all()


async def test_stop_drains_everything(state_root: Path, members: FakeMembers,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent_module, "CHECK_EVERY", 0.01)
    agent = Agent(AgentPaths.for_state_root(str(state_root)))
    assert agent.take_lock()
    assert not Agent(AgentPaths.for_state_root(str(state_root))).take_lock(), "one agent per state root"
    r = recipe(size=2)
    run = asyncio.ensure_future(agent.run(r))
    try:
        await until(lambda: r.key() in agent.pools, what="the first pool")
        kept = list((await _filled(agent, r)).ready)
        assert await agent.handle({"op": "stop"}) == ({"ok": True}, [])
        await asyncio.wait_for(run, 10)
        assert all(m.destroyed for m in kept)
    finally:
        run.cancel()


async def test_stop_right_after_a_configuration_change_removes_the_stale_members_too(
        state_root: Path, members: FakeMembers, monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent's process ends when :meth:`Agent.run` returns (``asyncio.run`` cancels what
    is left): a stale pool still being drained then must be finished first."""
    monkeypatch.setattr(agent_module, "CHECK_EVERY", 0.01)
    agent = Agent(AgentPaths.for_state_root(str(state_root)))
    assert agent.take_lock()
    old = recipe(size=2, memory="1g")
    run = asyncio.ensure_future(agent.run(old))
    try:
        await until(lambda: old.key() in agent.pools, what="the first pool")
        stale = list((await _filled(agent, old)).ready)
        members.destroy_turns["1g"] = 1000  # the stale members take a while to go
        await agent.handle(claim(recipe(size=2, memory="2g")))
        await agent.handle({"op": "stop"})
        await asyncio.wait_for(run, 30)
        left = [m.id for m in stale if not m.destroyed]
        assert not left, f"the agent exited with stale members still there: {left}"
    finally:
        run.cancel()


async def test_over_the_socket_a_claim_passes_its_descriptors(state_root: Path, members: FakeMembers,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole path a kernel start takes: the client, the socket, the agent, the descriptor."""
    monkeypatch.setattr(agent_module, "CHECK_EVERY", 0.01)
    pipes: list[tuple[int, int]] = []

    def fds() -> list[int]:
        pipes.append(os.pipe())
        return [pipes[-1][1]]

    members.fds = fds
    client = PoolClient(str(state_root), timeout=10)
    r = recipe(size=1)
    try:
        async with serving(state_root, r) as (agent, run):
            assert oct(agent.paths.root.stat().st_mode & 0o777) == "0o700"
            await _filled(agent, r)
            claimed = await asyncio.to_thread(client.claim, r)
            member, got = claimed.member, claimed.fds
            claimed.release()
            assert member is not None and len(got) == 1
            os.write(got[0], b"slot")
            os.close(got[0])
            assert os.read(pipes[0][0], 10) == b"slot"
            await until(lambda: _closed(pipes[0][1], pipes[0][0]), what="the agent to close its copy once sent")
            with pytest.raises(SandboxError, match="unknown pool request"):
                await asyncio.to_thread(client.request, {"op": "dance"})
            with pytest.raises(SandboxError, match="not a pool recipe"):
                await asyncio.to_thread(client.request, {"op": "claim", "recipe": {"x": 1}})
            status = await asyncio.to_thread(client.status)
            assert status["running"] and status["pid"] == os.getpid()
            assert await asyncio.to_thread(client.stop)
            await asyncio.wait_for(run, 10)
            assert not await asyncio.to_thread(client.running)
            assert (await asyncio.to_thread(client.status))["running"] is False
    finally:
        for r_fd, _ in pipes:
            os.close(r_fd)


def test_a_request_is_answered_before_the_agent_exits(state_root: Path, members: FakeMembers,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """``pool stop`` gets its answer even when the agent has nothing to remove and exits at
    once: the agent runs under ``asyncio.run`` (which cancels what is left when ``run``
    returns), and the reply's thread starts late, as on a loaded host."""
    monkeypatch.setattr(agent_module, "CHECK_EVERY", 0.01)
    real = agent_module.to_thread

    async def late_replies(fn: Any, *args: Any, **kwargs: Any) -> Any:
        if fn is protocol.send:
            for _ in range(100):
                await asyncio.sleep(0)
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(agent_module, "to_thread", late_replies)
    agent = Agent(AgentPaths.for_state_root(str(state_root)))
    assert agent.take_lock()
    client = PoolClient(str(state_root), timeout=10)
    answered: list[Any] = []

    def stop() -> None:
        deadline = time.monotonic() + 10
        try:
            while not client.running():
                assert time.monotonic() < deadline, "the agent did not come up"
                time.sleep(0.01)
            answered.append(client.stop())
        except BaseException as e:  # the agent then ends at its idle timeout
            answered.append(e)

    thread = threading.Thread(target=stop, daemon=True)
    thread.start()
    asyncio.run(agent.run(recipe(size=0, idle=5.0)))  # in the main thread, as `pool serve` runs it
    thread.join(10)
    assert answered == [True], f"`pool stop` got no answer: {answered}"


async def test_claims_over_the_socket_at_once_never_share_a_member(state_root: Path, members: FakeMembers,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Many clients (threads, each its own connection) claim at the same moment."""
    monkeypatch.setattr(agent_module, "CHECK_EVERY", 0.01)
    r = recipe(size=4)
    async with serving(state_root, r) as (agent, run):
        await _filled(agent, r)
        barrier = threading.Barrier(12)

        def claim_one() -> str | None:
            client = PoolClient(str(state_root), timeout=10)
            barrier.wait(10)
            claimed = client.claim(r)
            claimed.release()
            assert claimed.fds == []
            return claimed.member["id"] if claimed.member else None

        with ThreadPoolExecutor(12) as pool:
            futures = [asyncio.wrap_future(pool.submit(claim_one)) for _ in range(12)]
            ids = [i for i in await asyncio.gather(*futures) if i]
        assert len(ids) >= 4 and len(ids) == len(set(ids)), ids
        assert all(m.handed_over <= 1 for m in members.made)
        await asyncio.to_thread(PoolClient(str(state_root)).stop)
        await asyncio.wait_for(run, 10)


async def test_a_claim_holds_the_refill_until_its_kernel_is_connected(state_root: Path, members: FakeMembers,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Connecting to a claimed VM must not compete with a restore for the host's cores: no
    refill begins while the claimer holds its connection open; it begins once it lets go,
    or once ``HOLD_MAX`` passes for a claimer that never does."""
    monkeypatch.setattr(agent_module, "CHECK_EVERY", 0.01)
    client = PoolClient(str(state_root), timeout=10)
    r = recipe(size=1)
    async with serving(state_root, r) as (agent, run):
        pool = await _filled(agent, r)
        claimed = await asyncio.to_thread(client.claim, r)
        assert claimed.member is not None and claimed.hold is not None
        status = await asyncio.to_thread(client.status)  # the agent's loop went round many times
        assert status["pools"][0]["held"] == 1
        assert len(members.made) == 1 and pool.starting is None, "a refill began during the claim"
        claimed.release()
        await _filled(agent, r)
        assert len(members.made) == 2 and (await asyncio.to_thread(client.status))["pools"][0]["held"] == 0

        monkeypatch.setattr(agent_module, "HOLD_MAX", 0.05)
        forgotten = await asyncio.to_thread(client.claim, r)  # a claimer that never lets go
        assert forgotten.member is not None
        await _filled(agent, r)
        assert forgotten.hold is not None and len(members.made) == 3
        forgotten.release()

        monkeypatch.setattr(agent_module, "HOLD_MAX", 600.0)
        stuck = await asyncio.to_thread(client.claim, r)
        assert stuck.member is not None
        assert await asyncio.to_thread(client.stop)
        await asyncio.wait_for(run, 10)  # a held claim does not keep the agent from stopping
        stuck.release()

