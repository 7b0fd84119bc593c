"""Talking to the pool agent: claim a member, ask it to give a VM slot back, status, stop.

Every call is blocking (run it off the event loop) and bounded by a timeout. When no agent
runs, :meth:`PoolClient.claim` starts one (detached, so it outlives a papermill process) with
the recipe to fill, and the start that asked goes on without a pooled sandbox.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import SandboxConnectionError, SandboxError
from . import protocol
from .paths import AgentPaths
from .recipe import Recipe


#: Seconds after which a start marker without an agent is stale.
STARTING_STALE = 30.0


class AgentNotRunning(SandboxConnectionError):
    """No pool agent answers at the socket."""


@dataclass
class Claim:
    """What a claim got: the member handed over (None if none was ready) and its descriptors.

    While ``hold`` (the claim's connection) is open, the agent begins no refill of the pool,
    so that connecting to the claimed kernel does not compete with a sandbox being started.
    """

    member: dict[str, Any] | None
    fds: list[int]
    hold: socket.socket | None = field(default=None, repr=False)

    def release(self) -> None:
        """Let the pool refill again (idempotent)."""
        if self.hold is not None:
            self.hold.close()
            self.hold = None


class PoolClient:
    """A connection per request to the agent of one state root."""

    def __init__(self, state_root: str | None = None, timeout: float = 60.0) -> None:
        self.paths = AgentPaths.for_state_root(state_root)
        self.timeout = timeout

    def request(self, message: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        """Send one request and return the reply with any descriptors passed along.

        Raises:
            AgentNotRunning: nothing listens at the socket.
            SandboxError: the agent answered with an error (its message).
            SandboxConnectionError: the connection broke.
        """
        reply, fds, sock = self._exchange(message)
        sock.close()
        return reply, fds

    def _exchange(self, message: dict[str, Any]) -> tuple[dict[str, Any], list[int], socket.socket]:
        """:meth:`request`, returning the connection too (the caller closes it)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            try:
                sock.connect(str(self.paths.socket))
            except (FileNotFoundError, ConnectionRefusedError) as e:
                raise AgentNotRunning(f"no pool agent at {self.paths.socket}") from e
            protocol.send(sock, message)
            reply, fds = protocol.receive(sock)
        except BaseException as e:
            sock.close()
            if isinstance(e, OSError) and not isinstance(e, AgentNotRunning):
                raise SandboxConnectionError(f"pool agent at {self.paths.socket}: {e}") from e
            raise
        if "error" in reply:
            sock.close()
            protocol.close_fds(fds)
            raise SandboxError(f"pool agent: {reply['error']}")
        return reply, fds, sock

    def running(self) -> bool:
        """Whether an agent answers."""
        try:
            self.request({"op": "ping"})
        except SandboxError:
            return False
        return True

    def claim(self, recipe: Recipe) -> Claim:
        """A ready member of ``recipe``'s pool, handed over (with its descriptors), if any.

        Also tells the agent the pool is wanted (it refills, or is made); starts an agent if
        none runs. With a member, the pool begins no refill until :meth:`Claim.release`.
        """
        try:
            reply, fds, sock = self._exchange({"op": "claim", "recipe": recipe.to_dict(), "hold": True})
        except AgentNotRunning:
            self.start_agent(recipe)
            return Claim(None, [])
        if reply.get("member") is None:
            sock.close()
            return Claim(None, fds)
        return Claim(reply["member"], fds, sock)

    def yield_slot(self) -> int:
        """Ask the agent to give VM slots back to a kernel start that waits for one: it removes
        a pooled VM (one still starting first). Returns how many it removed (0 without an agent)."""
        try:
            reply, _ = self.request({"op": "yield_slot"})
        except AgentNotRunning:
            return 0
        return int(reply.get("removed", 0))

    def status(self) -> dict[str, Any]:
        """``{"running": bool, "pools": [...]}`` (see :meth:`WarmPool.status`)."""
        try:
            reply, _ = self.request({"op": "status"})
        except AgentNotRunning:
            return {"running": False, "pools": []}
        return {"running": True, "pools": reply.get("pools", []), "pid": reply.get("pid")}

    def stop(self) -> bool:
        """Ask the agent to remove every pooled sandbox and exit; False if none ran."""
        try:
            self.request({"op": "stop"})
        except AgentNotRunning:
            return False
        return True

    def start_agent(self, recipe: Recipe | None = None) -> None:
        """Start an agent in the background (its own session, logging to its log file), with
        ``recipe`` as its first pool. A second agent of the same state root exits at once."""
        self.paths.ensure()
        if not self._mark_starting():
            return  # another process is starting one right now
        log_fd = os.open(self.paths.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "sandbox_kernels.pool", "--state-root",
                 str(self.paths.root.parent), "serve", "--recipe-stdin"],
                stdin=subprocess.PIPE, stdout=log_fd, stderr=log_fd, start_new_session=True,
                close_fds=True, cwd="/",
            )
        finally:
            os.close(log_fd)
        assert proc.stdin is not None
        try:
            proc.stdin.write(json.dumps(recipe.to_dict() if recipe else None).encode())
            proc.stdin.close()
        except BrokenPipeError:
            pass

    def _mark_starting(self) -> bool:
        """Claim the right to start the agent (a marker the agent removes once it serves), so
        that twenty papermill processes starting at once start one agent, not twenty."""
        for _ in range(2):
            try:
                os.close(os.open(self.paths.starting, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o600))
                return True
            except FileExistsError:
                try:
                    if time.time() - os.lstat(self.paths.starting).st_mtime < STARTING_STALE:
                        return False
                    os.unlink(self.paths.starting)  # an agent that died starting
                except FileNotFoundError:
                    continue
        return False
