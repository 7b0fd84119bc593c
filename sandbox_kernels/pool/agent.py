"""The pool agent: one process per user and state root that keeps the warm pools.

It listens on ``<state_root>/pool/agent.sock`` (a 0700 directory) and answers one request
per connection (see :mod:`.protocol`):

- ``claim {recipe}``: the pool of that recipe is wanted (made if new; pools of the same
  kernelspec with another recipe are stale and drained); a ready member, if any, is handed
  over (with its VM slot's lock as a passed descriptor) and never given to anyone else. With
  ``"hold": true`` the claimer keeps the connection open while it connects to the member's
  kernel, and the pool begins no refill until it closes (at most ``HOLD_MAX`` seconds).
- ``yield_slot``: a kernel start waits for a VM slot: remove a pooled VM.
- ``status``, ``ping``, ``stop`` (remove every pooled sandbox and exit).

Claims are atomic: requests are handled on one event loop and a member leaves its pool
before the first ``await``. Pools nobody asked for within their idle timeout are drained;
with no pool left, the agent exits. SIGTERM and SIGINT drain everything before exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import socket
import struct
from pathlib import Path
from typing import Any

from ..aio import to_thread
from ..client_sockets import listen_unix
from ..errors import SandboxError
from ..labels import CLAIMED_BY
from ..private_dirs import write_private_file
from ..provisioning.exit_cleanup import shielded
from . import protocol
from .paths import AgentPaths
from .recipe import Recipe
from .warm_pool import WarmPool

log = logging.getLogger("sandbox_kernels.pool")

#: Seconds between idle checks.
CHECK_EVERY = 1.0
#: The longest a claimer may hold its pool's refills (it connects in well under a second).
HOLD_MAX = 15.0


class Agent:
    """The pools of one state root, and the socket that serves them."""

    def __init__(self, paths: AgentPaths) -> None:
        self.paths = paths
        self.pools: dict[str, WarmPool] = {}
        self._stop = asyncio.Event()
        self._lock_fd: int | None = None
        self._draining: set[asyncio.Future[None]] = set()  # stale pools being drained
        self._serving: set[asyncio.Future[None]] = set()  # requests being answered

    def take_lock(self) -> bool:
        """Become the state root's agent; False if another one is."""
        self.paths.ensure()
        fd = os.open(self.paths.lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    async def run(self, first: Recipe | None = None) -> None:
        """Serve until stopped, idle or signalled; every pooled sandbox is removed on the way out."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        server = listen_unix(self.paths.socket)  # replaces a dead agent's (we hold the lock)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.paths.starting)
        log.info("Pool agent %d serving %s", os.getpid(), self.paths.socket)
        if first is not None:
            self.want(first)
        accept = asyncio.ensure_future(self._accept(server))
        try:
            while not self._stop.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), CHECK_EVERY)
                await self._expire()
                for pool in list(self.pools.values()):
                    await pool.keep_warm()
                if not self.pools:
                    log.info("Pool agent: no pool is wanted any more; exiting")
                    break
        finally:
            accept.cancel()
            server.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.paths.socket)
            self._stop.set()  # ends claimers' holds (see _until_let_go)
            if self._serving:  # answer what was accepted (`pool stop` itself) before exiting
                await asyncio.gather(*self._serving, return_exceptions=True)
            await shielded(self.drain_all())
            log.info("Pool agent %d stopped", os.getpid())

    def want(self, recipe: Recipe) -> WarmPool:
        """The recipe's pool (made if new); other pools of the same kernelspec are stale."""
        key = recipe.key()
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = WarmPool(recipe, log)
            log.info("Pool %s: keeping %d %s sandbox(es) ready", key, recipe.target, recipe.kernel_name)
            for other in list(self.pools.values()):
                if other is not pool and (other.recipe.kernel_name, other.recipe.runtime) == (
                        recipe.kernel_name, recipe.runtime):
                    log.info("Pool %s: its configuration changed (now pool %s); removing its sandboxes",
                             other.key, key)
                    del self.pools[other.key]
                    task = asyncio.ensure_future(shielded(other.drain()))
                    self._draining.add(task)
                    task.add_done_callback(self._draining.discard)
        pool.want(recipe)
        return pool

    async def drain_all(self) -> None:
        """Remove every pool's sandboxes."""
        pools, self.pools = list(self.pools.values()), {}
        for pool in pools:
            await pool.drain()
        while self._draining:  # stale pools (see want) go before the agent exits too
            await asyncio.gather(*self._draining, return_exceptions=True)

    async def _expire(self) -> None:
        for key, pool in list(self.pools.items()):
            if pool.expired():
                log.info("Pool %s: no start asked for %.0f s (pool_idle_timeout); removing its "
                         "sandboxes", key, pool.idle_for())
                del self.pools[key]
                await shielded(pool.drain())

    async def _accept(self, server: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(server)
            task = asyncio.ensure_future(self._serve(conn))
            self._serving.add(task)
            task.add_done_callback(self._serving.discard)

    async def _serve(self, conn: socket.socket) -> None:
        conn.setblocking(True)
        conn.settimeout(30)
        fds: list[int] = []
        try:
            pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                 struct.calcsize("3i")))
            if uid != os.getuid():  # the directory is 0700; a second lock all the same
                raise SandboxError(f"refusing a request from uid {uid}")
            request, passed = await to_thread(protocol.receive, conn)
            protocol.close_fds(passed)  # requests carry none
            with contextlib.ExitStack() as holds:
                try:
                    reply, fds = await self.handle(request, pid, holds)
                except (SandboxError, ValueError, KeyError, TypeError) as e:
                    reply = {"error": str(e)}
                await to_thread(protocol.send, conn, reply, fds)
                protocol.close_fds(fds)  # the peer has its own copies
                fds = []
                if reply.get("member") and request.get("hold"):
                    await self._until_let_go(conn)
        except (OSError, SandboxError) as e:
            log.debug("Pool agent: a request failed: %s", e)
        finally:
            protocol.close_fds(fds)  # sent (the peer has its own copies) or not: ours go
            conn.close()

    async def _until_let_go(self, conn: socket.socket) -> None:
        """Wait until the claimer closes ``conn`` (its kernel is connected), ``HOLD_MAX``
        passes or the agent stops."""
        conn.setblocking(False)
        closed = asyncio.ensure_future(asyncio.get_running_loop().sock_recv(conn, 1))
        stopping = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({closed, stopping}, timeout=HOLD_MAX, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in (closed, stopping):
                waiter.cancel()
            await asyncio.gather(closed, stopping, return_exceptions=True)

    async def handle(self, request: dict[str, Any], peer: int = 0,
                     holds: contextlib.ExitStack | None = None) -> tuple[dict[str, Any], list[int]]:
        """Answer one request from process ``peer``; returns the reply and the descriptors to
        pass with it. A claimed member belongs to ``peer`` from then on (see
        :func:`~sandbox_kernels.labels.owner_alive`): if it dies before adopting it, ``reap``
        removes the sandbox. A claim that asks to hold the pool's refills enters the hold into
        ``holds`` before the member leaves the pool (so no refill slips in between)."""
        op = request.get("op")
        if op == "ping":
            return {"ok": True}, []
        if op == "claim":
            pool = self.want(Recipe.from_dict(request["recipe"]))
            if request.get("hold") and holds is not None:
                holds.enter_context(pool.hold())
            member = pool.take()
            while member is not None and not await member.alive():
                log.warning("Pool %s: sandbox %s died while it waited; removing it", pool.key, member.id)
                await shielded(member.destroy())
                member = pool.take()
            if member is None:
                return {"member": None}, []
            try:
                info, fds = await member.hand_over()
                state_dir = Path(info["provisioner_info"]["state_dir"])
                write_private_file(state_dir / CLAIMED_BY, f"{peer}\n".encode(), "pool claim record")
            except Exception as e:  # whatever it was, the member is spent: it goes
                log.warning("Pool %s: could not hand sandbox %s over (%s); removing it", pool.key, member.id, e)
                await shielded(member.destroy())
                return {"member": None}, []
            log.info("Pool %s: sandbox %s claimed", pool.key, member.id)
            return {"member": info}, fds
        if op == "yield_slot":
            removed = 0
            for pool in self.pools.values():
                if pool.recipe.runtime == "libvirt" and await pool.shrink():
                    removed += 1
                    break
            return {"removed": removed}, []
        if op == "status":
            return {"pid": os.getpid(), "pools": [await p.status() for p in self.pools.values()]}, []
        if op == "stop":
            self._stop.set()
            return {"ok": True}, []
        raise ValueError(f"unknown pool request {op!r}")
