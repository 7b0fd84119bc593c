"""Warm-pool helpers: a fake pool member for the unit layer, and for the engine suites a
private agent per test (its own state root), waits on the agent's status, and its stop.

Every wait here polls a state the agent reports (a pool's ``ready`` count, the agent's lock),
bounded by a timeout; nothing sleeps to let something happen.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

from sandbox_kernels.errors import SandboxTimeout

CLI = [sys.executable, "-m", "sandbox_kernels.cli"]


# -- unit layer: a member that lives in memory ------------------------------------------------


class FakeMembers:
    """What the fake members did, and the faults the next starts produce (in order)."""

    def __init__(self) -> None:
        self.made: list[FakeMember] = []
        #: exceptions the next starts raise, first first (then starts succeed)
        self.failures: list[BaseException] = []
        #: while set, starts block until it is cleared (``release``)
        self.gate: asyncio.Event | None = None
        #: descriptors a hand-over passes along (made per member by this factory)
        self.fds: Callable[[], list[int]] = list
        #: loop turns a destroy takes, by the member's memory setting (default 1): a removal
        #: that is still under way when something else is checked
        self.destroy_turns: dict[str, int] = {}
        #: where the members' state directories go (a hand-over names one, as a real one does)
        self.state_root: Path | None = None

    def hold(self) -> None:
        """Make the next starts wait until :meth:`release`."""
        self.gate = asyncio.Event()

    def release(self) -> None:
        if self.gate is not None:
            self.gate.set()
        self.gate = None

    def ready(self) -> list[FakeMember]:
        return [m for m in self.made if m.started and not m.destroyed and not m.handed_over]

    def destroyed(self) -> list[FakeMember]:
        return [m for m in self.made if m.destroyed]

    def member_class(self) -> type:
        world = self

        class Member(FakeMember):
            def __init__(self, recipe: Any, log: Any) -> None:
                super().__init__(recipe, log, world)

        return Member


class FakeMember:
    """Stands in for :class:`sandbox_kernels.pool.member.Member` (same methods)."""

    def __init__(self, recipe: Any, log: Any, world: FakeMembers) -> None:
        self.id = str(uuid.uuid4())
        self.recipe = recipe
        self.world = world
        self.started = self.destroyed = self.dead = False
        self.handed_over = 0
        self.kept_warm = 0
        self.ready_since: float | None = None
        world.made.append(self)

    async def start(self) -> None:
        gate = self.world.gate
        if gate is not None:
            await gate.wait()
        await asyncio.sleep(0)
        if self.world.failures:
            raise self.world.failures.pop(0)
        self.started = True
        self.ready_since = time.monotonic()

    async def alive(self) -> bool:
        await asyncio.sleep(0)
        return not self.dead

    async def keep_warm(self) -> None:
        assert not self.destroyed and not self.handed_over, f"member {self.id} kept warm after it left"
        self.kept_warm += 1

    async def hand_over(self) -> tuple[dict[str, Any], list[int]]:
        assert not self.destroyed, f"member {self.id} handed over after it was destroyed"
        await asyncio.sleep(0)  # let other claims run meanwhile, as a real detach does
        self.handed_over += 1
        root = self.world.state_root or Path(tempfile.gettempdir())
        state_dir = root / self.id
        state_dir.mkdir(mode=0o700, exist_ok=True)
        return {"id": self.id, "provisioner_info": {"state_dir": str(state_dir)}}, self.world.fds()

    async def destroy(self) -> None:
        for _ in range(self.world.destroy_turns.get(self.recipe.settings.get("memory", ""), 1)):
            await asyncio.sleep(0)
        self.destroyed = True

    async def memory_bytes(self) -> int:
        return 1 << 20 if self.started else 0


async def until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Yield to the loop until ``predicate()`` holds (bounded)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.005)


# -- engine suites: a private agent per test -------------------------------------------------


def private_state_root() -> Path:
    """A fresh state root short enough for the agent's unix socket (pytest's tmp_path is not)."""
    return Path(tempfile.mkdtemp(prefix="skp-", dir="/tmp"))


def pool_cli(state_root: Path | str, *args: str, timeout: float = 360) -> subprocess.CompletedProcess[str]:
    """Run ``sandbox-kernels pool ARGS`` for ``state_root``'s agent."""
    env = {**os.environ, "SANDBOX_KERNELS_STATE_DIR": str(state_root)}
    done = subprocess.run([*CLI, "pool", "--state-root", str(state_root), *args], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (f"`sandbox-kernels pool {' '.join(args)}` failed ({done.returncode}):\n"
                                  f"{done.stdout}{done.stderr}\nagent log:\n{agent_log(state_root)}")
    return done


def pool_status(state_root: Path | str) -> dict[str, Any]:
    """``sandbox-kernels pool status --json``."""
    return json.loads(pool_cli(state_root, "status", "--json", timeout=120).stdout)


def pools_of(status: dict[str, Any], kernel_name: str) -> list[dict[str, Any]]:
    return [p for p in status["pools"] if p["kernel_name"] == kernel_name]


async def wait_pool(state_root: Path | str, kernel_name: str, ready: int = 1,
                    timeout: float = 240.0, key: str | None = None) -> dict[str, Any]:
    """Poll the agent's status until a pool of ``kernel_name`` (of ``key`` if given) has at
    least ``ready`` ready members; returns that pool's status."""
    from sandbox_kernels.pool.client import PoolClient

    client = PoolClient(str(state_root), timeout=60)
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        last = await asyncio.to_thread(client.status)
        for pool in pools_of(last, kernel_name):
            if (key is None or pool["key"] == key) and pool["ready"] >= ready:
                return pool
        await asyncio.sleep(0.25)
    raise SandboxTimeout(f"no pool of {kernel_name} with {ready} ready within {timeout:g} s: {last}; "
                         f"agent log:\n{agent_log(state_root)}")


async def wait_agent_gone(state_root: Path | str, timeout: float = 240.0) -> None:
    """Wait until the agent of ``state_root`` has removed its sandboxes and exited."""
    from sandbox_kernels.pool.cli import wait_stopped
    from sandbox_kernels.pool.paths import AgentPaths

    await asyncio.to_thread(wait_stopped, AgentPaths.for_state_root(str(state_root)), timeout)


def agent_log(state_root: Path | str) -> str:
    path = Path(state_root) / "pool" / "agent.log"
    try:
        return path.read_text()[-6000:]
    except OSError:
        return "(no agent log)"


def stop_agent(state_root: Path | str) -> None:
    """``sandbox-kernels pool stop`` (waits until the agent's sandboxes are gone)."""
    pool_cli(state_root, "stop")


def remove_state_root(state_root: Path | str) -> None:
    """Stop its agent, then remove the directory."""
    try:
        stop_agent(state_root)
    finally:
        shutil.rmtree(state_root, ignore_errors=True)


def containers(*filters: str) -> list[str]:
    """Ids of Docker containers (running or not) matching every ``label=...`` filter."""
    cmd = ["docker", "ps", "-aq"]
    for f in filters:
        cmd += ["--filter", f"label={f}"]
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=60).stdout.split()


def container_labels(ref: str) -> dict[str, str]:
    out = subprocess.run(["docker", "inspect", "-f", "{{json .Config.Labels}}", ref],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    return json.loads(out)


def _mounts_below(root: Path) -> list[str]:
    prefix = os.path.realpath(root).rstrip("/") + "/"
    with open("/proc/self/mountinfo") as f:
        return [p for p in (line.split()[4] for line in f) if p.startswith(prefix)]


@contextlib.contextmanager
def docker_pool_root(monkeypatch: Any, size: int = 2) -> Iterator[Path]:
    """A private state root with the Docker pool on (``size`` members), for one test; after
    it, ``pool stop``, and no pooled container of this session or ipc mount under the root may
    be left (they are removed, then the test fails)."""
    session = f"sandbox-kernels.session={os.environ.get('SANDBOX_KERNELS_SESSION', '')}"
    root = private_state_root()
    monkeypatch.setenv("SANDBOX_KERNELS_STATE_DIR", str(root))
    monkeypatch.setenv("SANDBOX_DOCKER_POOL_SIZE", str(size))
    try:
        yield root
    finally:
        try:
            remove_state_root(root)
        finally:
            pooled = containers("sandbox-kernels.pooled=1", session)
            mounts = _mounts_below(root)
            for cid in pooled:
                subprocess.run(["docker", "rm", "-f", cid], capture_output=True, timeout=60)
            for point in mounts:
                subprocess.run(["umount", "--lazy", point], capture_output=True, timeout=30)
        assert not pooled, f"pooled containers left after `pool stop`: {pooled}"
        assert not mounts, f"ipc mounts left under the test's state root: {mounts}"


async def fill_pool(root: Path, kernel_name: str, ready: int = 2) -> dict[str, Any]:
    """A first start (no agent yet: it starts cold and starts the agent), shut down at once;
    then wait until the pool has ``ready`` members. Returns the pool's status."""
    from helpers.kernels import start

    km, kc = await start(kernel_name, timeout=240)
    try:
        assert km.provisioner.sandbox_id == km.kernel_id, "no agent ran: the first start is cold"
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)
    return await wait_pool(root, kernel_name, ready=ready)


@contextlib.contextmanager
def start_phases() -> Iterator[list[dict[str, Any]]]:
    """Every start phase this process reports meanwhile."""
    from sandbox_kernels.provisioning import start_progress

    seen: list[dict[str, Any]] = []
    start_progress.add_sink(seen.append)
    try:
        yield seen
    finally:
        start_progress.remove_sink(seen.append)
