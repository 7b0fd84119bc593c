"""Host-side cost of a sandbox: resident memory of its processes and disk of its writable layer.

Everything is read from the host, never asked of the kernel: ``/proc/<pid>/status`` for the
local kernel, QEMU and SSH-host processes, Docker's stats API for a container's cgroup, block
counts for a VM's qcow2 overlay and the ``SizeRw`` of a container's writable layer.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MiB = 2**20


@dataclass
class Footprint:
    """What one sandbox costs the host.

    Attributes:
        rss_mib: resident memory now (MiB).
        peak_mib: the highest resident memory seen (``VmHWM``), where the host keeps it.
        disk_mib: disk allocated to the sandbox's writable layer (MiB), None where none exists.
        how: one line naming the source of the numbers.
    """

    rss_mib: float
    peak_mib: float | None
    disk_mib: float | None
    how: str


def proc_memory(pid: int) -> tuple[int, int]:
    """``(VmRSS, VmHWM)`` of ``pid`` in bytes; ``(0, 0)`` if it is gone."""
    rss = hwm = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return rss, hwm


def descendants(root: int) -> list[int]:
    """``root`` and every process below it, from ``/proc``."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    found, todo = [root], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def user_pids(user: str) -> list[int]:
    """Pids of the processes owned by ``user``."""
    uid = pwd.getpwnam(user).pw_uid
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    pids.append(int(entry))
            except OSError:
                continue
    return pids


def allocated_bytes(path: Path) -> int:
    """Disk blocks allocated under ``path`` (sparse qcow2 files count what they use)."""
    if path.is_file():
        return path.stat().st_blocks * 512
    total = 0
    for item in path.rglob("*"):
        try:
            if item.is_file() and not item.is_symlink():
                total += item.stat().st_blocks * 512
        except OSError:
            continue
    return total


def _sum_pids(pids: list[int]) -> tuple[float, float]:
    rss = hwm = 0
    for pid in pids:
        r, h = proc_memory(pid)
        rss, hwm = rss + r, hwm + h
    return rss / MiB, hwm / MiB


def local_footprint(km: Any) -> Footprint:
    """The local kernel process (and any children)."""
    rss, hwm = _sum_pids(descendants(km.provisioner.process.pid))
    return Footprint(rss, hwm, None, "VmRSS of the ipykernel process")


def vm_footprint(provisioner: Any) -> Footprint:
    """The domain's QEMU process and the kernel's qcow2 overlay directory."""
    from sandbox_kernels.runtimes.vm.libvirt_conn import LibvirtHost

    with LibvirtHost(provisioner.libvirt_uri) as host:
        pid = host.qemu_pid(provisioner.sandbox_name)
    if pid is None:
        raise RuntimeError(f"no QEMU process for {provisioner.sandbox_name}")
    rss, hwm = proc_memory(pid)
    overlay = Path(provisioner.images_dir) / provisioner.kernel_id
    return Footprint(rss / MiB, hwm / MiB, allocated_bytes(overlay) / MiB,
                     f"VmRSS of QEMU (guest {provisioner.memory_mb} MiB); "
                     f"qcow2 overlay in {provisioner.images_dir}/<kernel id>")


def docker_footprint(provisioner: Any) -> Footprint:
    """The container's cgroup (Docker stats: usage minus page cache) and its writable layer."""
    import docker

    client = docker.from_env(timeout=30)
    try:
        stats = client.api.stats(provisioner.container_id, stream=False)
        mem = stats.get("memory_stats", {})
        detail = mem.get("stats", {})
        cache = detail.get("total_inactive_file", detail.get("inactive_file", 0))
        usage = (mem.get("usage", 0) - cache) / MiB
        rows = client.api.containers(all=True, size=True, filters={"id": provisioner.container_id})
        disk = rows[0].get("SizeRw", 0) / MiB if rows else None
    finally:
        client.close()
    return Footprint(usage, None, disk, "cgroup memory usage minus inactive page cache; the container's SizeRw")


def ssh_footprint(user: str) -> Footprint:
    """All processes of the SSH login user: the kernel, its shell, sshd's session process."""
    rss, hwm = _sum_pids(user_pids(user))
    return Footprint(rss, hwm, None, f"VmRSS of every process of user {user} (kernel + sshd session)")
