"""``GET /sandbox-kernels/api/pool``: the warm pools as the panel shows them."""

from __future__ import annotations

import json
import tempfile
from typing import Any

import pytest

from jupyter_server_ext.pool_handler import POOL_FIELDS
from sandbox_kernels.errors import SandboxConnectionError
from sandbox_kernels.pool.client import PoolClient


@pytest.fixture
def jp_server_config() -> dict[str, object]:
    return {"ServerApp": {"jpserver_extensions": {"jupyter_server_ext": True}},
            "SandboxKernelsExtension": {"reap_on_start": False}}


@pytest.fixture(autouse=True)
def own_state_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """A state root where no agent runs (another test's agent is never asked)."""
    monkeypatch.setenv("SANDBOX_KERNELS_STATE_DIR", tempfile.mkdtemp(prefix="sk-pool-ep-", dir="/tmp"))


async def test_no_agent_means_no_pools(jp_fetch: Any) -> None:
    response = await jp_fetch("sandbox-kernels", "api", "pool")
    assert json.loads(response.body) == {"running": False, "pools": []}


async def test_the_agents_pools_with_the_panels_fields(jp_fetch: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    pool = {"key": "k1", "runtime": "libvirt", "kernel_name": "sandbox-nixos-vm", "target": 1, "ready": 1,
            "starting": 0, "memory_bytes": 600 << 20, "idle_expires_in": 540.5, "refill_seconds": [3.1],
            "last_error": None, "members": ["m1"]}
    monkeypatch.setattr(PoolClient, "status", lambda self: {"running": True, "pid": 7, "pools": [pool]})
    body = json.loads((await jp_fetch("sandbox-kernels", "api", "pool")).body)
    assert body == {"running": True, "pools": [{name: pool[name] for name in POOL_FIELDS}]}


async def test_a_broken_agent_is_a_502_with_its_message(jp_fetch: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from tornado.httpclient import HTTPClientError

    def broken(self: PoolClient) -> dict[str, Any]:
        raise SandboxConnectionError("pool agent at /x: connection reset")

    monkeypatch.setattr(PoolClient, "status", broken)
    with pytest.raises(HTTPClientError) as info:
        await jp_fetch("sandbox-kernels", "api", "pool")
    assert info.value.code == 502
    assert "connection reset" in json.loads(info.value.response.body)["message"]
