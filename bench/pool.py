"""Warm-pool figures: a start that claims a ready sandbox, the time to refill one, and the
host memory an idle pooled sandbox holds; and the papermill batch with the VM pool on.

The pool is turned on through its environment variable for this process only (the agent a
start spawns inherits it) and stopped again afterwards, its sandboxes removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any, Iterator

from .figures import POOL_MEMORY, POOLED, REFILL, Run
from .kernels import BenchError

#: The variable that sizes each runtime's pool.
POOL_ENV = {"vm": "NIXOS_VM_POOL_SIZE", "docker": "SANDBOX_DOCKER_POOL_SIZE",
            "gvisor": "SANDBOX_DOCKER_POOL_SIZE"}
MiB = 2**20
#: Seconds to wait for a pool member to become ready (a VM under TCG: ~5 s; a first boot more).
READY_TIMEOUT = 300.0


@contextlib.contextmanager
def pool_on(runtime: str, size: int = 1) -> Iterator[None]:
    """``runtime``'s pool of ``size`` for this process (and the agent it starts); the agent is
    stopped, its sandboxes removed, on the way out."""
    variable = POOL_ENV[runtime]
    old = os.environ.get(variable)
    os.environ[variable] = str(size)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = old
        stop_agent()


def stop_agent() -> None:
    """Stop this state root's pool agent and wait until its sandboxes are gone."""
    from sandbox_kernels.pool.cli import STOP_TIMEOUT, wait_stopped
    from sandbox_kernels.pool.client import PoolClient

    client = PoolClient()
    if client.stop():
        wait_stopped(client.paths, STOP_TIMEOUT)


async def ready_pool(kernel_name: str) -> dict[str, Any]:
    """The status of ``kernel_name``'s pool once a member is ready.

    Raises:
        BenchError: none became ready within ``READY_TIMEOUT`` (the pool's last error says why).
    """
    from sandbox_kernels.pool.client import PoolClient

    client = PoolClient()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READY_TIMEOUT
    last: dict[str, Any] = {}
    while loop.time() < deadline:
        status = await asyncio.to_thread(client.status)
        for pool in status["pools"]:
            if pool["kernel_name"] == kernel_name:
                last = pool
                if pool["ready"] >= 1:
                    return pool
        await asyncio.sleep(0.25)
    raise BenchError(f"the warm pool of {kernel_name} had no ready sandbox within {READY_TIMEOUT:g} s"
                     f"{': ' + last['last_error'] if last.get('last_error') else ''}")


async def measure(run: Run, count: int) -> None:
    """``count`` starts from ``run.runtime``'s pool (each paired with a local start), the
    refill time and memory of each member claimed."""
    if run.runtime not in POOL_ENV or count <= 0:
        return
    run.say(f"{run.runtime}: warm pool of 1: {count} starts from it")
    try:
        await _measure(run, count)
    except BenchError as e:
        run.say(f"{run.runtime}: warm pool: {e}")
        run.results.skip(POOLED, run.runtime, "s", str(e))


async def _measure(run: Run, count: int) -> None:
    with pool_on(run.runtime):
        first = await run.kernels.start(run.kernel_name)  # starts the agent, which fills the pool
        await run.kernels.stop(first)
        for i in range(count):
            pool = await ready_pool(run.kernel_name)
            if pool.get("refill_seconds"):
                run.row(REFILL).samples.append(pool["refill_seconds"][-1])
            if pool.get("memory_bytes"):
                run.row(POOL_MEMORY).samples.append(pool["memory_bytes"] / MiB)
            kernel = await run.kernels.start(run.kernel_name)
            claimed = kernel.km.provisioner.sandbox_id != kernel.kernel_id
            await run.kernels.stop(kernel)
            if not claimed:
                run.say(f"{run.runtime}: pool start {i + 1}/{count} was not claimed from the pool")
                continue
            run.row(POOLED).samples.append(kernel.start_seconds)
            run.say(f"{run.runtime}: start from the warm pool {i + 1}/{count}: {kernel.start_seconds:.2f} s")
            await ready_pool(run.kernel_name)  # the local start runs on a quiet host too, not beside a refill
            await run.paired_local_start(POOLED)
