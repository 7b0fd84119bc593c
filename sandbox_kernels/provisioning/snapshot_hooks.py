"""Snapshot hooks: what a runtime without snapshots answers (the defaults).

Runtimes that support snapshots (Docker, libvirt) override them. The snapshot service calls
them with the kernel marked busy (see ``SandboxProvisioner.busy``).
"""

from __future__ import annotations

from typing import ClassVar

from ..errors import SandboxUnavailable
from ..snapshots.model import Capabilities, Snapshot


class SnapshotHooks:
    """Snapshot hooks with the answers of a runtime that has no snapshots."""

    runtime: ClassVar[str] = ""

    def snapshot_capabilities(self) -> Capabilities:
        """Kinds of snapshot this runtime offers; default: none."""
        return Capabilities(kinds=[], default_kind="", note=f"the {self.runtime} runtime has no snapshots")

    async def snapshot_list(self) -> list[Snapshot]:
        """This kernel's snapshots; default: none."""
        return []

    async def snapshot_create(self, name: str, kind: str, keep: bool) -> Snapshot:
        """Take snapshot ``name``; called by :class:`SnapshotService` with the kernel marked busy.

        Raises:
            SandboxUnavailable: the runtime cannot take snapshots (the default).
        """
        raise SandboxUnavailable(f"the {self.runtime} runtime cannot take snapshots")

    async def snapshot_rollback(self, snapshot: Snapshot) -> bool:
        """Return to ``snapshot``; returns whether the kernel process was restarted.

        Raises:
            SandboxUnavailable: the runtime cannot roll back (the default).
        """
        raise SandboxUnavailable(f"the {self.runtime} runtime cannot roll back")

    async def snapshot_delete(self, snapshot: Snapshot) -> None:
        """Delete ``snapshot``.

        Raises:
            SandboxUnavailable: the runtime cannot delete snapshots (the default).
        """
        raise SandboxUnavailable(f"the {self.runtime} runtime cannot delete snapshots")
