"""Docker warm pools against the real Docker engine.

Each test has its own state root, so the pool agent its kernel starts spawns is its own; the
fixture stops it (``sandbox-kernels pool stop``) and checks that nothing pooled is left.
Waits are on what the agent reports (``pool status``) or on the engine's state, never sleeps.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Iterator

import pytest

from helpers.kernels import run_cell, start, wait_until
from helpers.pool import (CLI, agent_log, container_labels, containers, docker_pool_root, fill_pool,
                          pool_status, pools_of, private_state_root, start_phases, wait_agent_gone,
                          wait_pool)
from sandbox_kernels import labels

pytestmark = pytest.mark.docker

KERNEL = "sandbox-docker"


@pytest.fixture
def pool_root(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private state root with the Docker pool on (2 members); the agent is stopped after."""
    with docker_pool_root(monkeypatch, 2) as root:
        yield root


@pytest.fixture
def phases() -> Iterator[list[dict[str, Any]]]:
    with start_phases() as seen:
        yield seen


async def test_a_start_claims_a_ready_sandbox(pool_root: Path, phases: list[dict[str, Any]]) -> None:
    pool = await fill_pool(pool_root, KERNEL)
    ready_ids = pool["members"]
    assert pool["memory_bytes"] > 0 and pool["target"] == 2, pool
    shown = json.loads(subprocess.run([*CLI, "pool", "status", "--json"], capture_output=True, text=True,
                                      check=True, timeout=120).stdout)
    assert pools_of(shown, KERNEL)[0]["ready"] == 2 and pools_of(shown, KERNEL)[0]["memory_bytes"] > 0
    for member in ready_ids:
        (cid,) = containers(f"{labels.KERNEL_ID}={member}")
        assert container_labels(cid)[labels.POOLED] == "1"
    started = [await start(KERNEL, timeout=120) for _ in range(2)]
    try:
        for (km, kc), member in zip(started, ready_ids):
            prov = km.provisioner
            assert prov.sandbox_id == member != km.kernel_id, "the oldest ready member is claimed"
            assert prov.sandbox_name == f"sandbox-kernels-{member}"
            assert containers(f"{labels.KERNEL_ID}={member}", f"{labels.POOLED}=1")
            out = await run_cell(kc, "import socket; print(socket.gethostname(), 6 * 7)")
            assert out["stdout"] == f"sandbox-{member[:8]} 42\n", out
            mine = [p["phase"] for p in phases if p["kernel_id"] == km.kernel_id]
            assert mine[0] == "claimed" and mine[-1] == "ready" and "creating" not in mine, mine
        keys = {km.session.key for km, _ in started}
        assert len(keys) == 2, "two claimed kernels share an HMAC key"
    finally:
        for km, kc in started:
            kc.stop_channels()
            await km.shutdown_kernel(now=True)
    for member in ready_ids:
        assert not containers(f"{labels.KERNEL_ID}={member}"), "a claimed kernel's container outlived it"
        assert not (pool_root / member).exists(), "a claimed kernel's state directory outlived it"


#: One process of a batch: start a kernel when told to, claim the container as its own by
#: creating a file in it exclusively, report, and shut down when told to.
_CLAIMER = textwrap.dedent("""
    import asyncio, json, sys
    from jupyter_client.manager import AsyncKernelManager

    CODE = '''
    import os, socket
    try:
        fd = os.open("/tmp/owner", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        os.write(fd, {kid!r}.encode()); os.close(fd)
    except FileExistsError:
        pass
    print(open("/tmp/owner").read(), socket.gethostname())
    '''

    async def main():
        print("waiting", flush=True)
        sys.stdin.readline()
        km = AsyncKernelManager(kernel_name=sys.argv[1])
        await km.start_kernel()
        kc = km.client()
        kc.start_channels()
        await kc.wait_for_ready(timeout=120)
        out = []
        reply = await kc.execute_interactive(CODE.format(kid=km.kernel_id), timeout=60,
            output_hook=lambda m: out.append(m["content"].get("text", "")) if m["msg_type"] == "stream" else None)
        print(json.dumps({"kernel_id": km.kernel_id, "sandbox_id": km.provisioner.sandbox_id,
                          "status": reply["content"]["status"], "output": "".join(out)}), flush=True)
        sys.stdin.readline()
        kc.stop_channels()
        await km.shutdown_kernel(now=True)
        print("done", flush=True)

    asyncio.run(main())
""")


async def _claim_at_once(root: Path, n: int) -> list[dict[str, Any]]:
    """``n`` processes start a kernel each at the same moment (all imported and waiting
    first); each reports once its kernel ran code, and all run at once before any shuts down.
    Checks what must hold whatever was claimed; returns the reports."""
    procs = [subprocess.Popen([sys.executable, "-c", _CLAIMER, KERNEL], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in range(n)]
    reports: list[dict[str, Any]] = []
    try:
        for proc in procs:
            assert await asyncio.to_thread(proc.stdout.readline) == "waiting\n"  # type: ignore[union-attr]
        for proc in procs:
            proc.stdin.write("go\n")  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]
        for proc in procs:
            line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 300)  # type: ignore[union-attr]
            assert line, f"a claiming process died; agent log:\n{agent_log(root)}"
            reports.append(json.loads(line))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.stdin.write("stop\n")  # type: ignore[union-attr]
                proc.stdin.close()  # type: ignore[union-attr]
        for proc in procs:
            await asyncio.wait_for(asyncio.to_thread(proc.wait), 180)
    sandboxes = [r["sandbox_id"] for r in reports]
    assert len(set(sandboxes)) == n, f"a sandbox was given to two kernels: {reports}"
    for r in reports:
        assert r["status"] == "ok", r
        owner, hostname = r["output"].split()
        assert owner == r["kernel_id"], f"kernel {r['kernel_id']} runs in another kernel's container"
        assert hostname == f"sandbox-{r['sandbox_id'][:8]}"
    assert [p.returncode for p in procs] == [0] * n
    for sandbox in sandboxes:
        assert not containers(f"{labels.KERNEL_ID}={sandbox}"), "a container outlived its kernel"
    return reports


async def test_several_processes_claiming_at_once_never_share_a_sandbox(pool_root: Path) -> None:
    pool = await fill_pool(pool_root, KERNEL)
    reports = await _claim_at_once(pool_root, 4)
    claimed = [r for r in reports if r["sandbox_id"] != r["kernel_id"]]
    assert len(claimed) >= 2 and {r["sandbox_id"] for r in claimed} >= set(pool["members"]), reports


async def test_processes_that_find_no_agent_share_one(pool_root: Path) -> None:
    """Four processes start at once with no agent: every kernel works, and one agent serves
    the pool they all asked for."""
    await _claim_at_once(pool_root, 4)
    await wait_pool(pool_root, KERNEL, ready=2)
    serving = [line for line in agent_log(pool_root).splitlines() if " serving " in line]
    assert len(serving) == 1, f"more than one agent served:\n{agent_log(pool_root)}"


async def test_a_claimed_kernel_restarts_and_its_shutdown_removes_it(pool_root: Path) -> None:
    pool = await fill_pool(pool_root, KERNEL)
    km, kc = await start(KERNEL, timeout=120)
    member = km.provisioner.sandbox_id
    try:
        assert member == pool["members"][0]
        await run_cell(kc, "x = 41")
        await km.restart_kernel(now=True)
        await kc.wait_for_ready(timeout=120)
        out = await run_cell(kc, "print('x' in dir(), 6 * 7)")
        assert out["stdout"] == "False 42\n", out
        assert km.provisioner.sandbox_id == member and containers(f"{labels.KERNEL_ID}={member}")
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)
    assert not containers(f"{labels.KERNEL_ID}={member}")
    assert not (pool_root / member).exists()


async def test_a_configuration_change_drains_the_stale_members(pool_root: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    old = await fill_pool(pool_root, KERNEL)
    monkeypatch.setenv("SANDBOX_DOCKER_MEMORY", "768m")
    km, kc = await start(KERNEL, timeout=120)
    try:
        assert km.provisioner.sandbox_id == km.kernel_id, "a member of another memory size was claimed"

        async def drained() -> bool:
            return not any(containers(f"{labels.KERNEL_ID}={m}") for m in old["members"])

        assert await wait_until(drained, timeout=120), "the stale members were not removed"
        new = await wait_pool(pool_root, KERNEL, ready=1)
        assert new["key"] != old["key"]
        assert [p["key"] for p in pools_of(pool_status(pool_root), KERNEL)] == [new["key"]]
        (cid,) = containers(f"{labels.KERNEL_ID}={new['members'][0]}")
        memory = subprocess.run(["docker", "inspect", "-f", "{{.HostConfig.Memory}}", cid],
                                capture_output=True, text=True, check=True, timeout=60).stdout
        assert int(memory) == 768 * 2**20
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)


async def test_an_idle_pool_expires_and_the_agent_exits(pool_root: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Nobody asks: the pool expires, its members go and the agent exits; a kernel claimed
    from it before is no member any more and runs on."""
    monkeypatch.setenv("SANDBOX_DOCKER_POOL_SIZE", "1")
    monkeypatch.setenv("SANDBOX_KERNELS_POOL_IDLE_TIMEOUT", "30")  # room for a slow refill
    first = (await fill_pool(pool_root, KERNEL, ready=1))["members"][0]
    km, kc = await start(KERNEL, timeout=120)
    try:
        assert km.provisioner.sandbox_id == first
        pool = await wait_pool(pool_root, KERNEL, ready=1)  # refilled
        (member,) = pool["members"]
        assert containers(f"{labels.KERNEL_ID}={member}")
        await wait_agent_gone(pool_root, timeout=180)
        assert not containers(f"{labels.KERNEL_ID}={member}"), "an expired pool's member was left"
        assert pool_status(pool_root)["running"] is False
        assert "pool_idle_timeout" in agent_log(pool_root)
        out = await run_cell(kc, "print(6 * 7)")
        assert out["stdout"] == "42\n", "the agent's exit took a claimed kernel with it"
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)
    assert not containers(f"{labels.KERNEL_ID}={first}")


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
async def test_an_agent_that_is_killed_leaves_nothing(pool_root: Path, how: str) -> None:
    """SIGTERM: the agent removes its members and exits. SIGKILL: it cannot, and its members
    are orphans that `reap` removes (their owner, the agent, is gone)."""
    pool = await fill_pool(pool_root, KERNEL)
    pid = pool_status(pool_root)["pid"]
    os.kill(pid, getattr(signal, how))
    await wait_agent_gone(pool_root, timeout=180)
    if how == "SIGKILL":
        assert all(containers(f"{labels.KERNEL_ID}={m}") for m in pool["members"])
        reap = subprocess.run([*CLI, "reap", "--yes"], capture_output=True, text=True, timeout=300)
        assert reap.returncode == 0, reap.stderr
    for member in pool["members"]:
        assert not containers(f"{labels.KERNEL_ID}={member}"), f"{how}: member {member} was left"
        assert not (pool_root / member).exists(), f"{how}: member {member}'s state directory was left"


async def test_reap_takes_a_dead_claimers_sandbox_and_spares_a_live_pool(pool_root: Path) -> None:
    from helpers.orphans import start_orphan

    pool = await fill_pool(pool_root, KERNEL)
    claimed = pool["members"][0]
    start_orphan(KERNEL)  # claims the oldest member, then its process is SIGKILLed
    claimer = labels.claimed_by(str(pool_root / claimed))
    assert claimer is not None and containers(f"{labels.KERNEL_ID}={claimed}")
    live = (await wait_pool(pool_root, KERNEL, ready=2))["members"]
    assert claimed not in live
    # --min-age 0: what an agent that has run for longer than the default 600 s meets.
    reap = subprocess.run([*CLI, "reap", "--yes", "--min-age", "0"], capture_output=True, text=True,
                          timeout=300)
    assert reap.returncode == 0, reap.stderr
    assert not containers(f"{labels.KERNEL_ID}={claimed}"), f"the orphan was not reaped:\n{reap.stdout}"
    assert not (pool_root / claimed).exists()
    for member in live:
        assert containers(f"{labels.KERNEL_ID}={member}"), "reap removed a live agent's pooled sandbox"
        assert (pool_root / member).is_dir(), "reap removed a live pooled sandbox's state directory"
    assert (pool_root / "pool" / "agent.sock").exists(), f"reap removed the live agent's socket:\n{reap.stdout}"
    assert pool_status(pool_root)["running"]
    assert (await wait_pool(pool_root, KERNEL, ready=2))["members"] == live


def test_pool_stop_without_an_agent_says_so(pool_root: Path) -> None:
    out = subprocess.run([*CLI, "pool", "stop"], capture_output=True, text=True, check=True, timeout=60)
    assert "not running" in out.stdout


async def test_a_pool_from_the_jupyter_config_on_gvisor(pool_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pool is a setting like any other (here the admin's Jupyter config, not the
    environment), and gVisor kernels claim from it: the member runs under runsc."""
    from jupyter_client.manager import AsyncKernelManager
    from traitlets.config import Config

    monkeypatch.delenv("SANDBOX_DOCKER_POOL_SIZE")
    config = Config({"GVisorProvisioner": {"pool_size": 1}})

    async def start_gvisor() -> tuple[Any, Any]:
        km = AsyncKernelManager(kernel_name="sandbox-gvisor", config=config)
        await km.start_kernel()
        kc = km.client()
        kc.start_channels()
        try:
            await kc.wait_for_ready(timeout=240)
        except BaseException:
            kc.stop_channels()
            await km.shutdown_kernel(now=True)
            raise
        return km, kc

    km, kc = await start_gvisor()
    kc.stop_channels()
    await km.shutdown_kernel(now=True)
    (member,) = (await wait_pool(pool_root, "sandbox-gvisor", ready=1))["members"]
    (cid,) = containers(f"{labels.KERNEL_ID}={member}")
    runtime = subprocess.run(["docker", "inspect", "-f", "{{.HostConfig.Runtime}}", cid],
                             capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    assert runtime.startswith("runsc"), runtime
    km, kc = await start_gvisor()
    try:
        assert km.provisioner.sandbox_id == member
        out = await run_cell(kc, "print(6 * 7)", timeout=120)
        assert out["stdout"] == "42\n", out
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)
    assert not containers(f"{labels.KERNEL_ID}={member}")


async def test_a_member_that_died_in_the_pool_is_not_handed_out(pool_root: Path) -> None:
    """A ready member whose container was killed while it waited (the engine restarted, an
    admin's `docker kill`, the OOM killer) must not fail the start that claims it."""
    pool = await fill_pool(pool_root, KERNEL)
    dead = pool["members"][0]
    subprocess.run(["docker", "kill", containers(f"{labels.KERNEL_ID}={dead}")[0]], check=True,
                   capture_output=True, timeout=60)
    km, kc = await start(KERNEL, timeout=120)
    try:
        assert km.provisioner.sandbox_id == pool["members"][1], "the live member is claimed instead"
        out = await run_cell(kc, "print(6 * 7)")
        assert out["stdout"] == "42\n", out
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)

    async def removed() -> bool:
        return not containers(f"{labels.KERNEL_ID}={dead}")

    assert await wait_until(removed, timeout=120), "the dead member was left"


async def test_reap_from_another_state_root_spares_a_claimed_kernel(pool_root: Path, tmp_path: Path) -> None:
    """A claimed kernel whose agent has exited belongs to its claimer alone; a `reap` run with
    another state root (another server's, a shell's default) must not take it."""
    (member,) = (await fill_pool(pool_root, KERNEL, ready=2))["members"][:1]
    km, kc = await start(KERNEL, timeout=120)
    try:
        assert km.provisioner.sandbox_id == member
        stop = subprocess.run([*CLI, "pool", "stop"], capture_output=True, text=True, timeout=300)
        assert stop.returncode == 0, stop.stderr
        other = private_state_root()
        try:
            reap = subprocess.run([*CLI, "reap", "--yes"], capture_output=True, text=True, timeout=300,
                                  env={**os.environ, "SANDBOX_KERNELS_STATE_DIR": str(other)})
        finally:
            shutil.rmtree(other, ignore_errors=True)
        assert reap.returncode == 0, reap.stderr
        assert containers(f"{labels.KERNEL_ID}={member}"), f"a live claimed kernel was reaped:\n{reap.stdout}"
        out = await run_cell(kc, "print(6 * 7)")
        assert out["stdout"] == "42\n", out
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)
