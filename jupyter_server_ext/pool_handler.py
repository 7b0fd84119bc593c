"""``GET /sandbox-kernels/api/pool``: the warm pools of this host's pool agent, for the panel.

Answers ``{"running": bool, "pools": [{"runtime", "kernel_name", "target", "ready",
"starting", "memory_bytes", "idle_expires_in"}]}``; ``running`` is false (and ``pools``
empty) when no agent runs, which is the normal state with pools off.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from tornado import web

from sandbox_kernels.errors import SandboxError

#: The fields of a pool the panel shows (the agent's status says more).
POOL_FIELDS = ("runtime", "kernel_name", "target", "ready", "starting", "memory_bytes", "idle_expires_in")


def pool_report(status: dict[str, Any]) -> dict[str, Any]:
    """The endpoint's answer from :meth:`PoolClient.status`'s."""
    pools = [{name: pool.get(name) for name in POOL_FIELDS} for pool in status.get("pools", [])]
    return {"running": bool(status.get("running")), "pools": pools}


def pool_status() -> dict[str, Any]:
    """Ask this server's pool agent (blocking: run it off the loop)."""
    from sandbox_kernels.pool.client import PoolClient

    return pool_report(PoolClient().status())


class PoolHandler(APIHandler):
    """The warm pools (read-only)."""

    auth_resource = "kernels"

    @web.authenticated
    @authorized
    async def get(self) -> None:
        try:
            report = await asyncio.to_thread(pool_status)
        except SandboxError as e:
            raise web.HTTPError(502, f"the warm-pool agent did not answer: {e}") from e
        self.finish(json.dumps(report))
