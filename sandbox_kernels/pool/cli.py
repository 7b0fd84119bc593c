"""``sandbox-kernels pool``: run, inspect or stop the warm-pool agent.

- ``pool serve``: run the agent in the foreground (a kernel start runs one on demand).
- ``pool status``: the pools, their ready sandboxes and the memory they hold.
- ``pool stop``: remove every pooled sandbox and stop the agent (waits until it is gone).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import logging
import os
import sys
import time
from typing import Any

from ..errors import SandboxTimeout
from .client import PoolClient
from .paths import AgentPaths

#: Seconds ``pool stop`` waits for the agent to remove its sandboxes and exit.
STOP_TIMEOUT = 300.0


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``pool`` to the ``sandbox-kernels`` command line."""
    pool = sub.add_parser("pool", help="the warm-pool agent (ready sandboxes for fast starts)")
    pool.add_argument("--state-root", default=None,
                      help="the state root whose agent (default: SANDBOX_KERNELS_STATE_DIR's rule)")
    actions = pool.add_subparsers(dest="pool_command", required=True)
    p = actions.add_parser("serve", help="run the agent in the foreground")
    p.add_argument("--recipe-stdin", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=serve)
    p = actions.add_parser("status", help="show the pools")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=status)
    p = actions.add_parser("stop", help="remove every pooled sandbox and stop the agent")
    p.set_defaults(func=stop)


def serve(args: argparse.Namespace) -> int:
    """Run the agent until it is stopped or no pool is wanted."""
    from .agent import Agent
    from .recipe import Recipe

    first = None
    if args.recipe_stdin:
        data = json.loads(sys.stdin.read(1 << 20) or "null")
        first = Recipe.from_dict(data) if data else None
    agent = Agent(AgentPaths.for_state_root(args.state_root))
    if not agent.take_lock():
        logging.getLogger("sandbox_kernels.pool").info("Pool agent: another agent serves %s", agent.paths.root)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(agent.paths.starting)
        return 0
    asyncio.run(agent.run(first))
    return 0


def status(args: argparse.Namespace) -> int:
    """Print the pools."""
    found = PoolClient(args.state_root).status()
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    if not found["running"]:
        print("pool agent: not running (a kernel start with pool_size > 0 starts it)")
        return 0
    print(f"pool agent: running (pid {found.get('pid')})")
    for pool in found["pools"]:
        print(describe(pool))
    return 0


def describe(pool: dict[str, Any]) -> str:
    """One pool in one line."""
    refill = pool.get("refill_seconds") or []
    line = (f"  {pool['kernel_name']} ({pool['runtime']}): {pool['ready']}/{pool['target']} ready"
            f"{', 1 starting' if pool.get('starting') else ''}, holding "
            f"{pool['memory_bytes'] / 2**20:.0f} MiB, idle expiry in {pool['idle_expires_in']:.0f} s")
    if refill:
        line += f", refill {refill[-1]:.1f} s"
    if pool.get("last_error"):
        line += f"\n    last start failed: {pool['last_error'].splitlines()[0]}"
    return line


def stop(args: argparse.Namespace) -> int:
    """Stop the agent and wait until its sandboxes are gone."""
    client = PoolClient(args.state_root)
    if not client.stop():
        print("pool agent: not running")
        return 0
    wait_stopped(client.paths, STOP_TIMEOUT)
    print("pool agent: stopped; its sandboxes are removed")
    return 0


def wait_stopped(paths: AgentPaths, timeout: float) -> None:
    """Wait until no agent holds the lock of ``paths`` (it has removed its sandboxes).

    Raises:
        SandboxTimeout: it still runs after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(paths.lock, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        finally:
            os.close(fd)
        if time.monotonic() > deadline:
            raise SandboxTimeout(f"the pool agent did not stop within {timeout:g} s; see {paths.log}")
        time.sleep(0.2)
