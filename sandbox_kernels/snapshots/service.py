"""The snapshot service: validation, naming, coordination with the kernel's lifecycle.

Runtimes implement the ``snapshot_*`` hooks of :class:`~sandbox_kernels.provisioning.base.
SandboxProvisioner`; this service is what every caller (REST handlers, the control socket,
the CLI) goes through. While an operation runs the provisioner is marked busy, so ``poll``
does not report the kernel dead and the restarter leaves it alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import inspect
import time
import weakref
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from ..errors import SandboxConfigError, SandboxNotFound, SandboxQuotaExceeded
from ..settings import check_name
from .model import Capabilities, RollbackResult, Snapshot
from .quota import Quota

if TYPE_CHECKING:
    from ..provisioning.base import SandboxProvisioner


class SnapshotService:
    """Snapshot operations on one kernel's sandbox; one operation at a time per kernel."""

    def __init__(self, provisioner: SandboxProvisioner) -> None:
        self.provisioner = provisioner
        self._lock = _lock_for(provisioner)

    def capabilities(self) -> Capabilities:
        """What this runtime can snapshot."""
        return self.provisioner.snapshot_capabilities()

    async def list(self) -> list[Snapshot]:
        """The kernel's snapshots, oldest first."""
        snaps = await self.provisioner.snapshot_list()
        return sorted(snaps, key=lambda s: s.created)

    async def create(self, name: str | None = None, kind: str | None = None, keep: bool = False) -> Snapshot:
        """Take a snapshot named ``name`` (generated when None) of kind ``kind``.

        Raises:
            SandboxConfigError: bad name, unknown kind, or the name is taken.
            SandboxQuotaExceeded: the kernel holds ``snapshot_max_count`` snapshots already,
                or this one would take its snapshots over ``snapshot_max_bytes`` (then it is
                deleted again).
            SandboxError: the runtime failed.
        """
        caps = self.capabilities()
        kind = kind or caps.default_kind
        if kind not in caps.kinds:
            raise SandboxConfigError(
                f"snapshot kind {kind!r} is not offered by the {self.provisioner.runtime} runtime; "
                f"use one of: {', '.join(caps.kinds)}."
            )
        name = check_name(name or _generated_name(), "snapshot name")
        async with self._lock, self.provisioner.busy():
            existing = await self.provisioner.snapshot_list()
            if any(s.name == name for s in existing):
                raise SandboxConfigError(f"a snapshot named {name!r} already exists for this kernel; pick another name.")
            quota = Quota.of(self.provisioner)
            quota.check_room(existing)
            snap = await self.provisioner.snapshot_create(name, kind, keep)
            try:
                quota.check_taken(existing, snap)
            except SandboxQuotaExceeded:
                await self.provisioner.snapshot_delete(snap)
                raise
            return snap

    async def rollback(self, name: str) -> RollbackResult:
        """Return the kernel's sandbox to snapshot ``name``.

        Raises:
            SandboxNotFound: no such snapshot.
        """
        async with self._held(name) as snap:
            started = time.monotonic()
            async with self.provisioner.busy():
                restarted = await self.provisioner.snapshot_rollback(snap)
            if restarted:
                await self._settle_restarted_kernel()
            return RollbackResult(name, snap.kind, restarted, round(time.monotonic() - started, 3))

    async def _settle_restarted_kernel(self, timeout: float = 60.0) -> None:
        """Ask the restarted kernel for kernel_info until its manager has seen it go idle.

        A kernel that starts publishes "starting" and nothing more until it gets a request;
        jupyter_server shows that state (and JupyterLab a busy kernel) until then. The reply's
        busy/idle pair settles it; it is asked again if the server's iopub stream had not
        reconnected in time to see the pair.
        """
        km = getattr(self.provisioner, "parent", None)
        if km is None or not hasattr(km, "client"):
            return
        from jupyter_client.session import Session

        # A session of its own: clients sharing the manager's session share its ZMQ identity,
        # and the kernel's shell socket answers only one of them.
        session = Session(key=km.session.key, signature_scheme=km.session.signature_scheme)
        kc = km.client(session=session)
        kc.start_channels()
        deadline = time.monotonic() + timeout
        try:
            while True:
                ready = kc.wait_for_ready(timeout=timeout)
                if inspect.isawaitable(ready):
                    await ready
                if getattr(km, "execution_state", "idle") != "starting":
                    return
                if time.monotonic() > deadline:
                    self.provisioner.log.warning(
                        "Kernel %s answers after the rollback, but the server still shows it "
                        "starting", self.provisioner.kernel_id)
                    return
                await asyncio.sleep(0.5)
        except RuntimeError as e:  # jupyter_client's "Kernel didn't respond" / "died"
            self.provisioner.log.warning("Kernel %s did not answer after the rollback: %s",
                                         self.provisioner.kernel_id, e)
        finally:
            kc.stop_channels()

    async def delete(self, name: str) -> None:
        """Delete snapshot ``name``.

        Raises:
            SandboxNotFound: no such snapshot.
        """
        async with self._held(name) as snap:
            await self.provisioner.snapshot_delete(snap)

    @contextlib.asynccontextmanager
    async def _held(self, name: str) -> AsyncIterator[Snapshot]:
        """Snapshot ``name``, found with this kernel's snapshot lock taken; the lock is held
        until the block ends.

        Raises:
            SandboxConfigError: a bad name (before the lock is taken).
            SandboxNotFound: no such snapshot.
        """
        check_name(name, "snapshot name")
        async with self._lock:
            yield await self._find(name)

    async def _find(self, name: str) -> Snapshot:
        for snap in await self.provisioner.snapshot_list():
            if snap.name == name:
                return snap
        raise SandboxNotFound(f"kernel {self.provisioner.kernel_id} has no snapshot named {name!r}.")

    async def describe(self) -> dict[str, Any]:
        """The listing the REST API and CLI return."""
        caps = self.capabilities()
        return {
            "kernel_id": self.provisioner.kernel_id,
            "runtime": self.provisioner.runtime,
            "sandbox": self.provisioner.sandbox_description(),
            **caps.to_dict(),
            "snapshots": [s.to_dict() for s in await self.list()],
        }


def _generated_name() -> str:
    return dt.datetime.now().strftime("snap-%Y%m%d-%H%M%S-%f")[:-3]


#: One lock per provisioner (snapshot operations on one sandbox never overlap); held
#: here rather than on the provisioner, whose attributes are its own.
_LOCKS: weakref.WeakKeyDictionary[Any, asyncio.Lock] = weakref.WeakKeyDictionary()


def _lock_for(provisioner: Any) -> asyncio.Lock:
    return _LOCKS.setdefault(provisioner, asyncio.Lock())
