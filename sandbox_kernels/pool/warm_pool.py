"""One warm pool: the ready members of one recipe, refilled in the background.

Members start one at a time (a start is CPU-heavy; the host's other kernels come first). A
failed start is logged and retried after a growing pause. A VM member that finds no free VM
slot waits for one without queueing (``SlotBusy``), so a kernel start always goes first, and
:meth:`WarmPool.shrink` gives slots back when a kernel start waits for one. Likewise a refill
does not begin while a claimed member's kernel is being connected (:meth:`WarmPool.hold`): a
restore takes both cores of a small host, and the login to the claimed VM would wait for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Iterator

from ..errors import SandboxError
from ..provisioning.exit_cleanup import shielded
from .member import Member
from .recipe import Recipe

#: Seconds between refill attempts after a failure (doubling up to the maximum).
RETRY_FIRST, RETRY_MAX = 2.0, 60.0
#: Seconds a refill waits after it gave a slot back before it tries again.
PRESSURE_PAUSE = 30.0


class SlotBusy(SandboxError):
    """A pool member found no free VM slot (raised by the VM provisioner of a member)."""


class WarmPool:
    """The members of one recipe's pool."""

    def __init__(self, recipe: Recipe, log: logging.Logger) -> None:
        self.recipe = recipe
        self.key = recipe.key()
        self.log = log
        self.ready: list[Member] = []
        self.starting: Member | None = None
        self.last_wanted = time.monotonic()
        self.last_error = ""
        self.refill_seconds: list[float] = []  # how long each member took to become ready
        self._paused_until = 0.0
        self._holds = 0  # claims being connected: no refill begins meanwhile
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    # -- asked by the agent ---------------------------------------------------------------------

    def want(self, recipe: Recipe) -> None:
        """A start asked for this pool: it lives on, with the latest size and idle time."""
        self.recipe = recipe
        self.last_wanted = time.monotonic()
        self.wake()

    def take(self) -> Member | None:
        """The oldest ready member, removed from the pool (atomic: no await)."""
        if not self.ready:
            return None
        member = self.ready.pop(0)
        self.wake()
        return member

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """No refill begins inside this block (one already under way goes on)."""
        self._holds += 1
        try:
            yield
        finally:
            self._holds -= 1
            self.wake()

    def idle_for(self) -> float:
        """Seconds since a start last asked for this pool."""
        return time.monotonic() - self.last_wanted

    def expired(self) -> bool:
        """Whether nobody asked for longer than the recipe's idle timeout."""
        return self.idle_for() > self.recipe.idle_timeout

    def wake(self) -> None:
        """Look at the pool's size again now."""
        self._wake.set()
        if self._task is None and not self._closed:
            self._task = asyncio.ensure_future(self._refill())

    async def shrink(self) -> bool:
        """Remove one member (a starting one first) and pause refills for a while: a kernel
        start waits for the resources it holds. Returns whether one was removed."""
        self._paused_until = time.monotonic() + PRESSURE_PAUSE
        if self.starting is not None and self._task is not None:
            self.log.info("Pool %s: giving a starting sandbox's VM slot to a waiting kernel", self.key)
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None
            self.wake()
            return True
        if self.ready:
            member = self.ready.pop()
            self.log.info("Pool %s: giving sandbox %s's VM slot to a waiting kernel", self.key, member.id)
            await shielded(member.destroy())
            return True
        return False

    async def keep_warm(self) -> None:
        """Keep each ready member quick to claim; a failure is the member's (logged at debug):
        a claim then goes the slower way, or finds the member dead."""
        for member in list(self.ready):
            try:
                await member.keep_warm()
            except (SandboxError, OSError) as e:
                self.log.debug("Pool %s: keeping sandbox %s warm failed: %s", self.key, member.id, e)

    async def drain(self) -> None:
        """Stop refilling and remove every member."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None
        members, self.ready = self.ready, []
        for member in members:
            await shielded(member.destroy())

    async def status(self) -> dict[str, Any]:
        """Size, ready and starting members, memory held, idle expiry, last error."""
        memory = 0
        for member in list(self.ready):
            with contextlib.suppress(Exception):
                memory += await member.memory_bytes()
        return {
            "key": self.key, "runtime": self.recipe.runtime, "kernel_name": self.recipe.kernel_name,
            "target": self.recipe.target, "ready": len(self.ready),
            "starting": int(self.starting is not None), "held": self._holds, "memory_bytes": memory,
            "idle_expires_in": max(0.0, self.recipe.idle_timeout - self.idle_for()),
            "refill_seconds": self.refill_seconds[-5:], "last_error": self.last_error,
            "members": [m.id for m in self.ready],
        }

    # -- the refill loop ------------------------------------------------------------------------

    async def _refill(self) -> None:
        retry = RETRY_FIRST
        try:
            while not self._closed:
                self._wake.clear()
                wait = self._paused_until - time.monotonic()
                if len(self.ready) >= self.recipe.target or self.expired() or self._holds:
                    await self._wake.wait()
                    continue
                if wait > 0:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), wait)
                    continue
                started = time.monotonic()
                member = Member(self.recipe, self.log)
                self.starting = member
                try:
                    await member.start()
                except SlotBusy:
                    await shielded(member.destroy())
                    self._paused_until = time.monotonic() + RETRY_FIRST
                    continue
                except (SandboxError, OSError) as e:
                    await shielded(member.destroy())
                    self.last_error = str(e)
                    self.log.warning("Pool %s: a sandbox did not start (retrying in %.0f s): %s",
                                     self.key, retry, e)
                    self._paused_until = time.monotonic() + retry
                    retry = min(retry * 2, RETRY_MAX)
                    continue
                except BaseException:
                    await shielded(member.destroy())
                    raise
                finally:
                    self.starting = None
                retry = RETRY_FIRST
                self.last_error = ""
                self.refill_seconds.append(time.monotonic() - started)
                self.ready.append(member)
                self.log.info("Pool %s (%s): sandbox %s ready in %.1f s (%d of %d)", self.key,
                              self.recipe.kernel_name, member.id, self.refill_seconds[-1],
                              len(self.ready), self.recipe.target)
        finally:
            if self._task is asyncio.current_task():
                self._task = None
