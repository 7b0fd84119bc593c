"""Clean-up that always runs: through cancellation, and as a last resort at interpreter exit.

:func:`shielded` runs a clean-up coroutine to completion even when the task awaiting it is
being cancelled (Ctrl-C in papermill cancels the start). :func:`track` registers a provisioner
whose sandbox exists; if the interpreter exits with it still registered (an uncaught error, a
second Ctrl-C), its ``teardown()`` runs from an ``atexit`` handler. :func:`untrack` is called
by the provisioner once its sandbox is gone.
"""

from __future__ import annotations

import asyncio
import atexit
import weakref
from typing import Any, Awaitable, Protocol

from ..aio import exiting


class Teardown(Protocol):
    """What the exit-time registry needs of a provisioner."""

    sandbox_name: str

    def teardown(self) -> Awaitable[None]:
        """Remove everything created for the kernel; idempotent."""


async def shielded(coro: Awaitable[Any]) -> None:
    """Run ``coro`` (a clean-up) to completion even if the awaiting task is being cancelled.

    The cancellation is re-raised once the clean-up has finished.
    """
    task = asyncio.ensure_future(coro)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise


_live: weakref.WeakSet[Any] = weakref.WeakSet()
_atexit_registered = False


def track(provisioner: Teardown) -> None:
    """Tear ``provisioner``'s sandbox down at interpreter exit unless :func:`untrack` ran first."""
    global _atexit_registered
    _live.add(provisioner)
    if not _atexit_registered:
        atexit.register(_cleanup_at_exit)
        _atexit_registered = True


def untrack(provisioner: Teardown) -> None:
    """Forget ``provisioner``: its sandbox is gone."""
    _live.discard(provisioner)


def tracked() -> list[Teardown]:
    """The provisioners whose sandboxes would be torn down at exit (for tests)."""
    return list(_live)


def _cleanup_at_exit() -> None:
    exiting()
    for provisioner in list(_live):
        try:
            asyncio.run(provisioner.teardown())
        except Exception as e:  # at exit there is nobody left to raise to
            print(f"sandbox-kernels: could not clean up {provisioner.sandbox_name}: {e}")
