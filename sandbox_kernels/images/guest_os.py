"""What operating system a VM image holds, from the ``<name>.os-release`` file next to it.

"Python (NixOS VM)" runs whatever image ``base_image`` names: the NixOS build of
``images/nixos`` where Nix is available, or the Debian CI guest elsewhere. The image builds
record the guest's ``/etc/os-release`` beside the qcow2 so ``doctor``, the demo, the panel and
the kernel's start log can say which one a user actually gets, without booting it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

#: os-release is a few hundred bytes; a larger file is not one.
_MAX_BYTES = 16 * 1024
NIXOS_HINT = "build images/nixos with Nix for the NixOS image"


@dataclass(frozen=True)
class GuestOS:
    """The guest's name (os-release ``PRETTY_NAME``) and ``ID``; ``known`` is False without a record."""

    name: str
    id: str
    known: bool = True

    @property
    def is_nixos(self) -> bool:
        return self.id == "nixos"

    def describe(self) -> str:
        """One line for people: the OS, and for a guest that is not NixOS, how to get NixOS."""
        if not self.known:
            return f"unknown guest OS ({self.name})"
        if self.is_nixos:
            return self.name
        return f"{self.name}: the CI guest, not NixOS ({NIXOS_HINT})"


def record_path(image: str | os.PathLike[str]) -> Path:
    """``<name>.os-release`` next to ``image`` (``<name>.qcow2``)."""
    path = Path(image)
    stem = path.with_suffix("") if path.suffix == ".qcow2" else path
    return stem.with_name(stem.name + ".os-release")


def parse(text: str) -> dict[str, str]:
    """os-release's ``KEY=value`` lines (quotes removed), as os-release(5) describes them."""
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip().isidentifier():
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            fields[key.strip()] = value
    return fields


def guest_os(image: str | os.PathLike[str]) -> GuestOS:
    """The OS recorded next to ``image`` (or next to the file a symlink points at)."""
    for candidate in (record_path(image), record_path(os.path.realpath(image))):
        try:
            with open(candidate, "rb") as f:
                fields = parse(f.read(_MAX_BYTES).decode(errors="replace"))
        except OSError:
            continue
        name = fields.get("PRETTY_NAME") or fields.get("NAME") or "unnamed OS"
        return GuestOS(name=name[:120], id=fields.get("ID", "")[:40])
    return GuestOS(name=f"no {record_path(image).name} next to the image", id="", known=False)
