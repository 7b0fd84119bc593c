"""Calls to a test Jupyter server (pytest-jupyter's ``jp_fetch``): start a kernel, and the
extension's REST API (``/sandbox-kernels/api/...``) with its status codes and messages."""

from __future__ import annotations

import json
from typing import Any

from tornado.httpclient import HTTPClientError

def extension_config() -> dict[str, Any]:
    """The server config that loads our extension (the ``jp_server_config`` fixture's value)."""
    return {"ServerApp": {"jpserver_extensions": {"jupyter_server_ext": True}}}


async def start_server_kernel(jp_fetch: Any, jp_serverapp: Any, name: str) -> tuple[str, Any]:
    """Start kernel ``name`` through the server's REST API; return its id and a ready client."""
    r = await jp_fetch("api", "kernels", method="POST", body=json.dumps({"name": name}), request_timeout=400)
    kid = json.loads(r.body)["id"]
    kc = jp_serverapp.kernel_manager.get_kernel(kid).client()
    kc.start_channels()
    await kc.wait_for_ready(timeout=120)
    return kid, kc


async def api(jp_fetch: Any, *parts: str, method: str = "GET", body: Any = None) -> Any:
    """Call the extension's API; returns the decoded JSON body (None when empty)."""
    kw: dict[str, Any] = {"method": method, "request_timeout": 300}
    if body is not None:
        kw["body"] = body if isinstance(body, str) else json.dumps(body)
    elif method == "POST":
        kw["body"] = "{}"
    r = await jp_fetch("sandbox-kernels", "api", *parts, **kw)
    return json.loads(r.body) if r.body else None


async def api_status(jp_fetch: Any, *parts: str, method: str = "GET", body: Any = None) -> tuple[int, str]:
    """Call the extension's API; returns the HTTP status and the error message ('' on 200)."""
    try:
        await api(jp_fetch, *parts, method=method, body=body)
    except HTTPClientError as e:
        msg = json.loads(e.response.body).get("message", "") if e.response and e.response.body else ""
        return e.code, msg
    return 200, ""
