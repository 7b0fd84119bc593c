"""A kernel's snapshot quota: how many snapshots, and how many bytes, one kernel may hold.

Snapshots are taken on request of the notebook user (REST API, panel) or of any process of
the server's user (control socket, CLI); kept ones (``keep=true``) outlive the kernel. Without
a bound, one kernel fills the host's Docker storage or libvirt pool. The quota counts every
snapshot of the kernel, kept ones included, and is checked by :class:`~sandbox_kernels.
snapshots.service.SnapshotService` for every runtime.

Sizes are what a runtime reports per snapshot (for Docker: the committed layer). A runtime
that reports no size (``None``) is bound by the count alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from traitlets import Int, TraitError

from ..errors import SandboxConfigError, SandboxQuotaExceeded
from ..settings import parse_size
from .model import Snapshot

_HOW_TO_FREE = (
    "Delete snapshots you no longer need (the panel's delete button, DELETE "
    "/sandbox-kernels/api/kernels/{kernel}/snapshots/<name>, or `sandbox-kernels snapshot "
    "delete {kernel} <name>`); kept snapshots count too."
)


class ByteSize(Int):  # type: ignore[misc]
    """A number of bytes, given as an integer or a size such as ``'10g'`` or ``'512m'``."""

    info_text = "a size in bytes, such as 10737418240, '10g' or '512m'"

    def validate(self, obj: Any, value: Any) -> int:
        if isinstance(value, str):
            try:
                value = parse_size(value, self.name)
            except SandboxConfigError as e:
                raise TraitError(str(e)) from e
        return int(super().validate(obj, value))

    def from_string(self, s: str) -> int:
        return parse_size(s, self.name)


def _human(size: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


@dataclass(frozen=True)
class Quota:
    """The snapshot bounds of one kernel, from its provisioner's settings."""

    kernel_id: str
    max_count: int
    max_bytes: int
    runtime: str

    @classmethod
    def of(cls, provisioner: Any) -> Quota:
        """The quota set on ``provisioner`` (``snapshot_max_count``, ``snapshot_max_bytes``)."""
        return cls(provisioner.kernel_id, int(provisioner.snapshot_max_count),
                   int(provisioner.snapshot_max_bytes), provisioner.runtime)

    def _raise_hint(self, setting: str, variable: str) -> str:
        return (f"A server admin can raise c.SandboxProvisioner.{setting} in a Jupyter config "
                f"file or {variable} in the server's environment.")

    def check_room(self, snapshots: list[Snapshot], estimate: int | None = None) -> None:
        """Before a snapshot is taken: is there room for one more (of ``estimate`` bytes)?

        A runtime that can measure a snapshot before writing it (Docker: the container's
        writable layer) passes ``estimate``, so an oversized one is never written.

        Raises:
            SandboxQuotaExceeded: the kernel already holds ``max_count`` snapshots or
                ``max_bytes`` of them, or ``estimate`` more bytes would exceed ``max_bytes``.
        """
        how = _HOW_TO_FREE.format(kernel=self.kernel_id)
        if len(snapshots) >= self.max_count:
            raise SandboxQuotaExceeded(
                f"kernel {self.kernel_id} holds {len(snapshots)} snapshot(s), the most "
                f"snapshot_max_count={self.max_count} allows. {how} "
                + self._raise_hint("snapshot_max_count", "SANDBOX_KERNELS_SNAPSHOT_MAX_COUNT"))
        used = _used(snapshots)
        if used >= self.max_bytes:
            raise SandboxQuotaExceeded(
                f"kernel {self.kernel_id}'s snapshots use {_human(used)}, the most "
                f"snapshot_max_bytes={_human(self.max_bytes)} allows. {how} "
                + self._raise_hint("snapshot_max_bytes", "SANDBOX_KERNELS_SNAPSHOT_MAX_BYTES"))
        if estimate is not None and used + estimate > self.max_bytes:
            raise SandboxQuotaExceeded(
                f"the sandbox's changed files ({_human(estimate)}, sparse files counted whole) "
                f"would bring kernel {self.kernel_id}'s snapshots to {_human(used + estimate)}, "
                f"over snapshot_max_bytes={_human(self.max_bytes)}; nothing was written. Delete "
                f"large files in the sandbox, or snapshots: {how} "
                + self._raise_hint("snapshot_max_bytes", "SANDBOX_KERNELS_SNAPSHOT_MAX_BYTES"))

    def check_taken(self, snapshots: list[Snapshot], new: Snapshot) -> None:
        """After a snapshot was taken (its size is known only now): does it fit?

        Raises:
            SandboxQuotaExceeded: with ``new`` the kernel's snapshots exceed ``max_bytes``;
                the caller deletes ``new``.
        """
        used = _used([*snapshots, new])
        if used > self.max_bytes:
            raise SandboxQuotaExceeded(
                f"snapshot {new.name!r} ({_human(new.size or 0)}) would bring kernel "
                f"{self.kernel_id}'s snapshots to {_human(used)}, over snapshot_max_bytes="
                f"{_human(self.max_bytes)}, so it was not kept. "
                f"{_HOW_TO_FREE.format(kernel=self.kernel_id)} "
                + self._raise_hint("snapshot_max_bytes", "SANDBOX_KERNELS_SNAPSHOT_MAX_BYTES"))


def _used(snapshots: list[Snapshot]) -> int:
    return sum(max(0, s.size or 0) for s in snapshots)
