"""Docker warm pools under attack: a kernel claimed from the pool keeps every hostile property
of a kernel started cold, and cannot spoil the pool for the next claimer.

The attacks are those of :mod:`hostile.test_docker` (reused, not copied), run against kernels
that were claimed from a pool: the sandbox was prepared by the agent, before anyone asked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import pytest

from helpers.kernels import run_cell, start
from helpers.pool import containers, docker_pool_root, fill_pool, pool_status, pools_of, start_phases, wait_pool
from hostile import test_docker as docker_attacks
from hostile.test_docker import Canary, canary  # noqa: F401  (the canary fixture)
from sandbox_kernels import labels

pytestmark = [pytest.mark.hostile, pytest.mark.docker]

KERNEL = docker_attacks.KERNEL


@pytest.fixture
def pool_root(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    with docker_pool_root(monkeypatch, 2) as root:
        yield root


def _claimed(phases: list[dict[str, Any]]) -> list[str]:
    return [p["kernel_id"] for p in phases if p["phase"] == "claimed"]


async def test_a_claimed_kernel_cannot_reach_the_host_through_shared_dirs(pool_root: Path,
                                                                         canary: Canary) -> None:
    """Symlinks, hard links, FIFOs and a sparse file in every directory shared with the host
    (the ipc directory), through restart, auto-restart, snapshot, rollback and shutdown."""
    pool = await fill_pool(pool_root, KERNEL)
    with start_phases() as phases:
        await docker_attacks.drive_attacked_kernel(canary)
    assert len(_claimed(phases)) == 1, "the attacked kernel was not claimed from the pool"
    member = pool["members"][0]
    assert not containers(f"{labels.KERNEL_ID}={member}"), "the attacked pooled container was left"
    assert not (pool_root / member).exists(), "the attacked pooled sandbox's state directory was left"
    # The pool itself is untouched: the agent answers and refills, the other member was never
    # reachable from the attacked kernel and still works.
    refilled = await wait_pool(pool_root, KERNEL, ready=2)
    assert pool["members"][1] in refilled["members"]
    km, kc = await start(KERNEL, timeout=docker_attacks.STEP_TIMEOUT)
    try:
        assert km.provisioner.sandbox_id == pool["members"][1]
        out = await run_cell(kc, "print(6 * 7)")
        assert out["stdout"] == "42\n", out
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)


async def test_a_claimed_kernels_sockets_swapped_for_symlinks_redirect_nothing(pool_root: Path,
                                                                               tmp_path: Path) -> None:
    """The claimed kernel swaps its ipc sockets for symlinks to a host socket and dies: the
    clients' reconnects must not follow them."""
    await fill_pool(pool_root, KERNEL)
    with start_phases() as phases:
        await docker_attacks.test_sockets_swapped_for_symlinks_do_not_redirect_the_clients(tmp_path)
    assert len(_claimed(phases)) == 1, "the attacked kernel was not claimed from the pool"


#: Runs in the claimed kernel: fill its ipc directory (the one host directory it can write)
#: with files until the filesystem refuses, and report how far it got.
FILL_IPC = r'''
import json, os, sys
info = json.load(open(sys.argv[sys.argv.index("-f") + 1]))
ipc = os.path.dirname(info["ip"])
n, written, error = 0, 0, ""
chunk = b"x" * (1 << 20)
try:
    while written < (8 << 30):
        with open(os.path.join(ipc, f"fill-{n}"), "wb") as f:
            for _ in range(64):
                f.write(chunk)
                written += len(chunk)
        n += 1
except OSError as e:
    error = e.strerror
print(json.dumps({"ipc": ipc, "files": n, "written": written, "error": error}))
'''


async def test_a_claimed_kernel_filling_its_ipc_dir_spoils_nothing_else(pool_root: Path) -> None:
    """The ipc directory is bounded (the host's disk is not filled), and a full one is the
    attacker's alone: the next claimed kernel and the agent work, the shutdown removes it."""
    pool = await fill_pool(pool_root, KERNEL)
    km, kc = await start(KERNEL, timeout=docker_attacks.STEP_TIMEOUT)
    state_dir = km.provisioner.state_dir
    try:
        assert km.provisioner.sandbox_id == pool["members"][0]
        out = await run_cell(kc, FILL_IPC, timeout=docker_attacks.STEP_TIMEOUT)
        assert out["status"] == "ok", out
        report = json.loads(out["stdout"].strip().splitlines()[-1])
        assert report["error"], f"the ipc directory took 8 GiB without refusing: {report}"
        # Nothing of the agent or of the other members is in the kernel's reach.
        other_dir = pool_root / pool["members"][1]
        probe = (f"import os; print([os.path.exists(p) for p in ({str(pool_root / 'pool' / 'agent.sock')!r}, "
                 f"{str(pool_root / 'pool')!r}, {str(other_dir)!r})])")
        assert (await run_cell(kc, probe))["stdout"] == "[False, False, False]\n"
        other, other_kc = await start(KERNEL, timeout=docker_attacks.STEP_TIMEOUT)
        try:
            assert other.provisioner.sandbox_id == pool["members"][1]
            assert (await run_cell(other_kc, "print(6 * 7)"))["stdout"] == "42\n"
        finally:
            other_kc.stop_channels()
            await other.shutdown_kernel(now=True)
        assert (await run_cell(kc, "print(6 * 7)"))["stdout"] == "42\n", "the filled kernel itself stops working"
        assert pools_of(pool_status(pool_root), KERNEL), "the agent stopped answering"
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)
    assert not state_dir.exists(), "the filled ipc directory was left on the host"
