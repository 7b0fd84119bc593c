"""Snapshots of the VM runtime: memory (libvirt internal) and disk-only (disk_snapshots.py).

A mixin of :class:`~sandbox_kernels.runtimes.vm.provisioner.LibvirtProvisioner`; the snapshots
themselves are taken and applied by its :class:`~.machine.Machine`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...aio import to_thread
from ...snapshots.model import Capabilities, Snapshot


class VMSnapshots:
    """Memory and disk snapshots of the kernel's VM."""

    # Provided by LibvirtProvisioner and its bases.
    log: Any

    # "memory": a libvirt internal snapshot of the running domain; rollback resumes it.
    # "disk": an internal snapshot of the writable disks alone (vm/disk_snapshots.py); rollback
    # boots the VM again from the restored disks and starts the kernel afresh.

    def snapshot_capabilities(self) -> Capabilities:
        """Memory snapshots (live, the default) and disk-only snapshots."""
        return Capabilities(
            kinds=["memory", "disk"], default_kind="memory",
            note="A memory snapshot captures the whole machine, memory included: a rollback "
                 "returns the kernel to that moment without restarting it. A disk snapshot is "
                 "cheaper and keeps the disks only: a rollback boots the VM again on them and "
                 "restarts the kernel (variables are not kept).",
        )

    def _meta_path(self) -> Path:
        return self.state_dir / "snapshots.json"

    def _snapshot_meta(self) -> dict[str, dict[str, Any]]:
        if self._state_dir is None or not self._meta_path().exists():
            return {}
        return dict(json.loads(self._meta_path().read_text()))

    def _save_meta(self, meta: dict[str, dict[str, Any]]) -> None:
        self._meta_path().write_text(json.dumps(meta))

    async def snapshot_list(self) -> list[Snapshot]:
        """The snapshots libvirt (memory) and the disk images (disk) have, with our metadata."""
        meta = self._snapshot_meta()
        present = await self._machine_now().snapshot_names(
            disk=any(m.get("kind") == "disk" for m in meta.values()))
        return [Snapshot(name=n, kind=m.get("kind", "memory"), created=m["created"], size=None,
                         keep=bool(m.get("keep"))) for n, m in meta.items() if n in present]

    async def snapshot_create(self, name: str, kind: str, keep: bool) -> Snapshot:
        """A memory snapshot (recording the kernel's pid and ports) or a disk-only one."""
        machine = self._machine_now()
        snap = Snapshot(name=name, kind=kind, keep=keep)
        entry: dict[str, Any] = snap.to_dict()
        if kind == "disk":
            # Crash-consistent at least: flush the guest's page cache first.
            tunnel = await self._tunnel_ready()
            await self._remote(tunnel.run, ["sync"], None, self.job_completion_timeout)
            entry["files"] = await machine.snapshot(name, self.job_completion_timeout, memory=False)
        else:
            await machine.snapshot(name, self.job_completion_timeout)
            entry.update(pid=self.pid, ports=self._remote_ports, preloader_pid=self._preloader_pid)
        meta = self._snapshot_meta()
        meta[name] = entry
        self._save_meta(meta)
        return snap

    async def snapshot_rollback(self, snapshot: Snapshot) -> bool:
        """Revert to the snapshot; returns whether the kernel was restarted (disk kind)."""
        meta = self._snapshot_meta()[snapshot.name]
        if snapshot.kind == "disk":
            await self._rollback_disk(snapshot.name, meta["files"])
            return True
        # The guest's random generator is the snapshot's again: the machine gives it fresh bytes.
        await self._machine_now().rollback(snapshot.name, self.job_completion_timeout,
                                           self.ssh_ready_timeout)
        tunnel = await self._tunnel_ready()
        await to_thread(tunnel.reconnect, self.ssh_ready_timeout)
        self.pid = meta.get("pid")
        self._preloader_pid = meta.get("preloader_pid")
        await self._rewatch()
        ports = meta.get("ports") or {}
        if ports and ports != self._remote_ports:
            await to_thread(self._forward, tunnel, ports)
        return False

    async def _rollback_disk(self, name: str, files: list[str]) -> None:
        """Power the VM off, restore its disks, boot it again and start the kernel.

        The domain comes back with the same configuration (ports, seed, keys), so the tunnel
        and its local ports stay; libvirt's memory-snapshot metadata, which a transient
        domain loses when it stops, is given back (the snapshots themselves are in the images).
        """
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        self.pid = self._preloader_pid = None
        await to_thread(self._pause_forwards)
        await self._machine_now().rollback_disks(name, files, self.job_completion_timeout)
        tunnel = await self._tunnel_ready()
        await self.wait_for_ssh(lambda: to_thread(tunnel.reconnect, 10))
        await self.start_kernel(self._last_cmd, self._sandbox_env)
        await self.wait_ready()

    async def snapshot_delete(self, snapshot: Snapshot) -> None:
        """Delete the snapshot from libvirt (memory) or from the disk images (disk)."""
        await self._machine_now().delete_snapshot(snapshot.name, memory=snapshot.kind != "disk")
        meta = self._snapshot_meta()
        meta.pop(snapshot.name, None)
        self._save_meta(meta)
