"""REST handlers. Only ``HTTPError`` text reaches the client: our errors map to 4xx/5xx.

Routes (under the server's base URL)::

    GET    /sandbox-kernels/api/kernels/{kernel_id}/snapshots
    POST   /sandbox-kernels/api/kernels/{kernel_id}/snapshots          {"name"?, "kind"?, "keep"?}
    POST   /sandbox-kernels/api/kernels/{kernel_id}/snapshots/{name}/rollback
    DELETE /sandbox-kernels/api/kernels/{kernel_id}/snapshots/{name}
    GET    /sandbox-kernels/api/runtimes
    GET    /sandbox-kernels/api/pool                                   (pool_handler.py)
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Awaitable, Callable

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from tornado import web

from jupyter_server_ext.pool_handler import PoolHandler

from sandbox_kernels.errors import (
    SandboxConfigError,
    SandboxConnectionError,
    SandboxError,
    SandboxNotFound,
    SandboxQuotaExceeded,
    SandboxTimeout,
    SandboxUnavailable,
)

_MAX_BODY = 16 * 1024
_NAME = r"[^/]+"
_KERNEL = r"[A-Za-z0-9_.-]+"
_STATUS = [
    (SandboxQuotaExceeded, 409),  # a per-kernel bound: free space (the message says how)
    (SandboxConfigError, 400),
    (SandboxNotFound, 404),
    (SandboxTimeout, 504),
    (SandboxUnavailable, 503),
    (SandboxConnectionError, 502),
    (SandboxError, 500),
]


class _Base(APIHandler):
    auth_resource = "kernels"

    def _service(self, kernel_id: str) -> Any:
        from sandbox_kernels.provisioning.base import SandboxProvisioner
        from sandbox_kernels.snapshots.service import SnapshotService

        try:
            km = self.kernel_manager.get_kernel(kernel_id)
        except KeyError:
            raise web.HTTPError(404, f"no kernel with id {kernel_id!r} on this server") from None
        provisioner = getattr(km, "provisioner", None)
        if not isinstance(provisioner, SandboxProvisioner):
            raise web.HTTPError(
                409,
                f"kernel {kernel_id} ({km.kernel_name}) was not started by a sandbox provisioner, "
                f"so it has no snapshots. Use a sandbox kernel such as 'Python (NixOS VM)' or "
                f"'Python (Docker)'.",
            )
        return SnapshotService(provisioner)

    def _body(self) -> dict[str, Any]:
        raw = self.request.body or b"{}"
        if len(raw) > _MAX_BODY:
            raise web.HTTPError(413, f"request body too large ({len(raw)} bytes; limit {_MAX_BODY})")
        try:
            body = json.loads(raw)
        except ValueError:
            raise web.HTTPError(400, "request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise web.HTTPError(400, "request body must be a JSON object")
        unknown = sorted(set(body) - {"name", "kind", "keep"})
        if unknown:
            raise web.HTTPError(400, f"unknown field(s) {unknown}; allowed: name, kind, keep")
        if body.get("name") is not None and not isinstance(body["name"], str):
            raise web.HTTPError(400, "'name' must be a string")
        if body.get("kind") is not None and not isinstance(body["kind"], str):
            raise web.HTTPError(400, "'kind' must be a string")
        if not isinstance(body.get("keep", False), bool):
            raise web.HTTPError(400, "'keep' must be true or false")
        return body

    async def _call(self, op: Callable[[], Awaitable[Any]]) -> Any:
        try:
            return await op()
        except SandboxError as e:
            status = next(code for cls, code in _STATUS if isinstance(e, cls))
            self.log.warning("sandbox-kernels: %s", e)
            raise web.HTTPError(status, str(e)) from e
        except asyncio.CancelledError:
            raise web.HTTPError(503, "the operation was cancelled (server shutting down)") from None


class SnapshotsHandler(_Base):
    """List and create snapshots of one kernel."""

    @web.authenticated
    @authorized
    async def get(self, kernel_id: str) -> None:
        service = self._service(kernel_id)
        self.finish(json.dumps(await self._call(service.describe)))

    @web.authenticated
    @authorized
    async def post(self, kernel_id: str) -> None:
        service = self._service(kernel_id)
        body = self._body()
        snap = await self._call(lambda: service.create(body.get("name"), body.get("kind"), body.get("keep", False)))
        self.set_status(201)
        self.finish(json.dumps(snap.to_dict()))


class RollbackHandler(_Base):
    """Roll a kernel back to a snapshot."""

    @web.authenticated
    @authorized
    async def post(self, kernel_id: str, name: str) -> None:
        service = self._service(kernel_id)
        result = await self._call(lambda: service.rollback(name))
        self.finish(json.dumps(result.to_dict()))


class SnapshotHandler(_Base):
    """Delete one snapshot."""

    @web.authenticated
    @authorized
    async def delete(self, kernel_id: str, name: str) -> None:
        service = self._service(kernel_id)
        await self._call(lambda: service.delete(name))
        self.set_status(204)
        self.finish()


class RuntimesHandler(APIHandler):
    """Which runtimes work on this server, and how to fix those that do not: every runtime
    record's ``doctor``, with the server's configuration (``c.DockerProvisioner.image``, ...)."""

    auth_resource = "kernelspecs"

    @web.authenticated
    @authorized
    async def get(self) -> None:
        from sandbox_kernels import doctor

        reports = await asyncio.to_thread(doctor.check_all, self.config)
        self.finish(json.dumps([r.to_dict() for r in reports]))


def handlers() -> list[tuple[str, type]]:
    """The URL patterns (relative to the base URL) and their handlers."""
    base = r"/sandbox-kernels/api"
    return [
        (rf"{base}/kernels/({_KERNEL})/snapshots/?", SnapshotsHandler),
        (rf"{base}/kernels/({_KERNEL})/snapshots/({_NAME})/rollback/?", RollbackHandler),
        (rf"{base}/kernels/({_KERNEL})/snapshots/({_NAME})/?", SnapshotHandler),
        (rf"{base}/runtimes/?", RuntimesHandler),
        (rf"{base}/pool/?", PoolHandler),
    ]
