"""What a snapshot is, as the REST API, the CLI and the panel show it."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
from typing import Any

#: Snapshot kinds: whole VM with memory, VM disk only, container filesystem.
KINDS = ("memory", "disk", "filesystem")


@dataclass
class Snapshot:
    """One snapshot of a kernel's sandbox."""

    name: str
    kind: str
    created: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    size: int | None = None
    keep: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)


@dataclass
class Capabilities:
    """Which kinds a runtime offers, and what rollback means for it."""

    kinds: list[str]
    default_kind: str
    note: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)


@dataclass
class RollbackResult:
    """The outcome of a rollback."""

    name: str
    kind: str
    kernel_restarted: bool
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)
