"""A kernel's control socket: snapshot requests from other processes (the CLI, scripts).

The provisioner that owns a kernel (in a Jupyter server, or in papermill) serves a unix socket
``<state dir>/control.sock`` (mode 0600, in a 0700 directory) while the kernel runs. Requests
and replies are one JSON object per line. This lets ``sandbox-kernels snapshot ...`` act on a
kernel started by papermill, which has no server.
"""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..client_sockets import listen_unix
from ..errors import (
    SandboxConfigError,
    SandboxConnectionError,
    SandboxError,
    SandboxNotFound,
    SandboxQuotaExceeded,
)
from ..settings import check_name, default_state_root

if TYPE_CHECKING:
    from ..provisioning.base import SandboxProvisioner

SOCKET_NAME = "control.sock"
_MAX_REQUEST = 64 * 1024
_ERRORS = {cls.__name__: cls for cls in (SandboxConfigError, SandboxNotFound, SandboxQuotaExceeded)}


class ControlServer:
    """Serves snapshot operations for one provisioner on its control socket."""

    def __init__(self, provisioner: SandboxProvisioner) -> None:
        self.provisioner = provisioner
        self.path = provisioner.state_dir / SOCKET_NAME
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        """Listen on the socket (replacing a stale one)."""
        sock = listen_unix(self.path)  # 0600 from the bind, in the kernel's 0700 state directory
        try:
            self._server = await asyncio.start_unix_server(self._handle, sock=sock,
                                                           limit=_MAX_REQUEST)
        except BaseException:
            sock.close()
            raise

    async def close(self) -> None:
        """Stop listening and remove the socket."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self.path.unlink(missing_ok=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=10)
            reply = await self._dispatch(json.loads(line))
        except (ValueError, asyncio.LimitOverrunError) as e:
            reply = {"ok": False, "error": "SandboxConfigError", "message": f"bad request: {e}"}
        except asyncio.TimeoutError:
            reply = {"ok": False, "error": "SandboxConfigError", "message": "no request received"}
        except SandboxError as e:
            reply = {"ok": False, "error": type(e).__name__, "message": str(e)}
        try:
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        finally:
            writer.close()

    async def _dispatch(self, request: dict[str, Any]) -> dict[str, Any]:
        from .service import SnapshotService

        service = SnapshotService(self.provisioner)
        op = request.get("op")
        if op == "list":
            result: Any = await service.describe()
        elif op == "create":
            snap = await service.create(request.get("name"), request.get("kind"), bool(request.get("keep")))
            result = snap.to_dict()
        elif op == "rollback":
            result = (await service.rollback(str(request.get("name")))).to_dict()
        elif op == "delete":
            await service.delete(str(request.get("name")))
            result = None
        else:
            raise SandboxConfigError(f"unknown operation {op!r}: use list, create, rollback or delete")
        return {"ok": True, "result": result}


class SnapshotClient:
    """Talks to the control socket of a running kernel, found by kernel id.

    Example (e.g. between papermill cells run by a script)::

        client = SnapshotClient(kernel_id)
        client.create("before-training")
        client.rollback("before-training")
    """

    def __init__(self, kernel_id: str, state_root: str | None = None, timeout: float = 300) -> None:
        root = Path(state_root or default_state_root())
        self.path = root / check_name(kernel_id, "kernel id") / SOCKET_NAME
        self.kernel_id = kernel_id
        self.timeout = timeout

    def request(self, op: str, **params: Any) -> Any:
        """Send one request and return its result.

        Raises:
            SandboxNotFound: no running sandbox kernel with that id (or the snapshot is missing).
            SandboxConfigError: the request was refused (bad name, ...).
            SandboxQuotaExceeded: the kernel's snapshot quota is used up.
            SandboxError: the operation failed.
        """
        if not self.path.exists():
            raise SandboxNotFound(
                f"no running sandbox kernel {self.kernel_id} owned by this user "
                f"(no control socket at {self.path}). Is the kernel running, and is "
                f"SANDBOX_KERNELS_STATE_DIR the same as the server's?"
            )
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.timeout)
            try:
                sock.connect(str(self.path))
                sock.sendall(json.dumps({"op": op, **params}).encode() + b"\n")
                data = sock.makefile("rb").readline()
            except OSError as e:
                raise SandboxConnectionError(f"control socket {self.path}: {e}") from e
        reply = json.loads(data or b'{"ok": false, "message": "no reply"}')
        if not reply.get("ok"):
            raise _ERRORS.get(reply.get("error", ""), SandboxError)(reply.get("message", "failed"))
        return reply.get("result")

    def list(self) -> dict[str, Any]:
        """The kernel's snapshots and what its runtime offers."""
        return self.request("list")  # type: ignore[no-any-return]

    def create(self, name: str | None = None, kind: str | None = None, keep: bool = False) -> dict[str, Any]:
        """Take a snapshot."""
        return self.request("create", name=name, kind=kind, keep=keep)  # type: ignore[no-any-return]

    def rollback(self, name: str) -> dict[str, Any]:
        """Roll back to a snapshot."""
        return self.request("rollback", name=name)  # type: ignore[no-any-return]

    def delete(self, name: str) -> None:
        """Delete a snapshot."""
        self.request("delete", name=name)
