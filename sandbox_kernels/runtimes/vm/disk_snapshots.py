"""Disk-only snapshots of a running VM: internal qcow2 snapshots of its writable disks.

libvirt takes an internal snapshot of a running domain only together with its memory. QEMU
can take one of the disks alone, live, in a fraction of a second (QMP
``blockdev-snapshot-internal-sync``, all disks in one ``transaction`` so they agree). The
snapshot lives inside the overlay file next to the memory snapshots, so the two kinds mix
freely. Rolling back applies it to the images while QEMU is stopped (``qemu-img snapshot
-a``); the VM then boots again from the restored disks.
"""

from __future__ import annotations

import subprocess
from typing import TYPE_CHECKING, Any

from ...errors import SandboxError, SandboxTimeout

if TYPE_CHECKING:
    from .libvirt_conn import LibvirtHost


def writable_disks(host: LibvirtHost, domain: str) -> list[tuple[str, str]]:
    """``(node name, image file)`` of each writable qcow2 disk of the running domain.

    Raises:
        SandboxError: QEMU could not be asked.
    """
    disks = []
    for block in host.qmp(domain, "query-block") or []:
        inserted: dict[str, Any] = block.get("inserted") or {}
        if inserted.get("drv") != "qcow2" or inserted.get("ro"):
            continue
        disks.append((str(inserted.get("node-name") or block["device"]), str(inserted["file"])))
    return disks


def create(host: LibvirtHost, domain: str, snapshot: str) -> list[str]:
    """Snapshot every writable disk of the running domain at the same instant.

    Returns:
        The image files that now hold ``snapshot`` (what :func:`apply` needs).

    Raises:
        SandboxError: QEMU refused (the message says why).
    """
    disks = writable_disks(host, domain)
    if not disks:
        raise SandboxError(f"VM {domain} has no writable qcow2 disk to snapshot")
    actions = [{"type": "blockdev-snapshot-internal-sync", "data": {"device": node, "name": snapshot}}
               for node, _ in disks]
    host.qmp(domain, "transaction", {"actions": actions})
    return [path for _, path in disks]


def names(host: LibvirtHost, domain: str) -> set[str]:
    """Internal snapshot names present on every writable disk of the running domain.

    Raises:
        SandboxError: QEMU could not be asked.
    """
    found: set[str] | None = None
    for block in host.qmp(domain, "query-block") or []:
        inserted = block.get("inserted") or {}
        if inserted.get("drv") != "qcow2" or inserted.get("ro"):
            continue
        here = {str(s["name"]) for s in (inserted.get("image") or {}).get("snapshots", [])}
        found = here if found is None else found & here
    return found or set()


def delete(host: LibvirtHost, domain: str, snapshot: str) -> None:
    """Delete ``snapshot`` from every writable disk that has it (live).

    Raises:
        SandboxError: QEMU refused.
    """
    for node, _ in writable_disks(host, domain):
        try:
            host.qmp(domain, "blockdev-snapshot-delete-internal-sync", {"device": node, "name": snapshot})
        except SandboxError as e:
            if "not found" not in str(e).lower():
                raise


def apply(files: list[str], snapshot: str, timeout: float) -> None:
    """Return each image to ``snapshot``; QEMU must not have them open.

    Raises:
        SandboxTimeout: ``qemu-img`` took longer than ``timeout`` seconds.
        SandboxError: ``qemu-img`` failed (its message is included).
    """
    for path in files:
        try:
            done = subprocess.run(["qemu-img", "snapshot", "-a", snapshot, path],
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise SandboxTimeout(f"restoring disk snapshot {snapshot!r} onto {path} took over {timeout:g} s") from e
        except FileNotFoundError as e:
            raise SandboxError("qemu-img is not installed (Debian: apt-get install qemu-utils)") from e
        if done.returncode != 0:
            raise SandboxError(f"restoring disk snapshot {snapshot!r} onto {path}: {done.stderr.strip()}")
