"""Snapshots of the libvirt runtime: memory (libvirt internal) and disk-only (vm/disk_snapshots.py).

A mixin of :class:`~sandbox_kernels.runtimes.vm.provisioner.LibvirtProvisioner`.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

from ...aio import to_thread
from ...snapshots.model import Capabilities, Snapshot
from . import disk_snapshots, golden
from .seed import refresh_random_seed


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
        host = await self._libvirt()
        present = set(await to_thread(host.snapshot_list, self.sandbox_name))
        if any(m.get("kind") == "disk" for m in meta.values()):
            present |= await to_thread(disk_snapshots.names, host, self.sandbox_name)
        return [Snapshot(name=n, kind=m.get("kind", "memory"), created=m["created"], size=None,
                         keep=bool(m.get("keep"))) for n, m in meta.items() if n in present]

    async def snapshot_create(self, name: str, kind: str, keep: bool) -> Snapshot:
        """A memory snapshot (recording the kernel's pid and ports) or a disk-only one."""
        host = await self._libvirt()
        snap = Snapshot(name=name, kind=kind, keep=keep)
        entry: dict[str, Any] = snap.to_dict()
        if kind == "disk":
            # Crash-consistent at least: flush the guest's page cache first.
            tunnel = await self._tunnel_ready()
            await self._remote(tunnel.run, ["sync"], None, self.job_completion_timeout)
            entry["files"] = await asyncio.wait_for(
                to_thread(disk_snapshots.create, host, self.sandbox_name, name), self.job_completion_timeout)
        else:
            await asyncio.wait_for(to_thread(host.snapshot_create, self.sandbox_name, name, True),
                                   self.job_completion_timeout)
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
        host = await self._libvirt()
        await asyncio.wait_for(to_thread(host.snapshot_revert, self.sandbox_name, snapshot.name),
                               self.job_completion_timeout)
        await self._reseed_after_rollback()
        tunnel = await self._tunnel_ready()
        await to_thread(tunnel.reconnect, self.ssh_ready_timeout)
        self.pid = meta.get("pid")
        self._preloader_pid = meta.get("preloader_pid")
        await self._rewatch()
        ports = meta.get("ports") or {}
        if ports and ports != self._remote_ports:
            await to_thread(self._forward, tunnel, ports)
        return False

    async def _reseed_after_rollback(self) -> None:
        """The guest's random generator is the snapshot's again: give it fresh bytes.

        The seed disk gets new random bytes and the guest's reseed agent mixes them in (the
        same agent a VM restored from a golden snapshot uses); otherwise two rollbacks to one
        snapshot would hand out the same random numbers (keys, tokens, uuids).

        Raises:
            SandboxError: the guest could not reseed (its reason is included).
        """
        vm_dir = self._image_dir
        await to_thread(refresh_random_seed, vm_dir / "seed.img", os.urandom(32))
        await to_thread(golden.reseed, str(vm_dir / "reseed.sock"), self.ssh_ready_timeout)

    async def _rollback_disk(self, name: str, files: list[str]) -> None:
        """Power the VM off, restore its disks, boot it again and start the kernel.

        The domain comes back with the same configuration (ports, seed, keys), so the tunnel
        and its local ports stay; libvirt's memory-snapshot metadata, which a transient
        domain loses when it stops, is given back (the snapshots themselves are in the images).
        """
        host = await self._libvirt()
        xml = await to_thread(host.restart_xml, self.sandbox_name)
        memory_snapshots = await to_thread(host.snapshot_xmls, self.sandbox_name)
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        self.pid = self._preloader_pid = None
        await to_thread(self._pause_forwards)
        await to_thread(host.destroy, self.sandbox_name)
        await to_thread(disk_snapshots.apply, files, name, self.job_completion_timeout)
        console = self.console_path
        await self._with_outbound(lambda: host.start_xml(self.sandbox_name, xml))
        if memory_snapshots:
            await to_thread(host.snapshot_redefine, self.sandbox_name, memory_snapshots)
        tunnel = await self._tunnel_ready()
        await self._wait_for_ssh(console, lambda: to_thread(tunnel.reconnect, 10))
        await self.start_kernel(self._last_cmd, self._sandbox_env)
        await self.wait_ready()

    async def snapshot_delete(self, snapshot: Snapshot) -> None:
        """Delete the snapshot from libvirt (memory) or from the disk images (disk)."""
        host = await self._libvirt()
        if snapshot.kind == "disk":
            await to_thread(disk_snapshots.delete, host, self.sandbox_name, snapshot.name)
        else:
            await to_thread(host.snapshot_delete, self.sandbox_name, snapshot.name)
        meta = self._snapshot_meta()
        meta.pop(snapshot.name, None)
        self._save_meta(meta)
