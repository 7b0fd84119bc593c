"""Snapshots of the VM runtime: memory (libvirt internal) and disk-only (disk_snapshots.py).

:class:`VMSnapshots` is held by :class:`~sandbox_kernels.runtimes.vm.provisioner.LibvirtProvisioner`
(``provisioner.snapshots``), whose snapshot hooks call it. It works on the provisioner's
:class:`~.machine.Machine` and :class:`~sandbox_kernels.remote.kernel.RemoteKernel`, reached
through the provisioner's public names only, and keeps its own metadata file.

"memory": a libvirt internal snapshot of the running domain; rollback resumes it, and the kernel
of that moment (pid, preloader, ports) is adopted again. "disk": an internal snapshot of the
writable disks alone; rollback boots the VM again from the restored disks and starts the kernel
afresh.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...aio import to_thread
from ...remote.kernel import KernelState
from ...snapshots.model import Capabilities, Snapshot

if TYPE_CHECKING:
    from .provisioner import LibvirtProvisioner

CAPABILITIES = Capabilities(
    kinds=["memory", "disk"], default_kind="memory",
    note="A memory snapshot captures the whole machine, memory included: a rollback "
         "returns the kernel to that moment without restarting it. A disk snapshot is "
         "cheaper and keeps the disks only: a rollback boots the VM again on them and "
         "restarts the kernel (variables are not kept).",
)


class VMSnapshots:
    """Memory and disk snapshots of one kernel's VM, with their metadata."""

    def __init__(self, provisioner: LibvirtProvisioner) -> None:
        self.prov = provisioner

    def meta(self) -> dict[str, dict[str, Any]]:
        """Our record of each snapshot (kind, creation time, keep, the kernel of a memory one)."""
        path = self._meta_path()
        if path is None or not path.exists():
            return {}
        return dict(json.loads(path.read_text()))

    def kept(self) -> list[str]:
        """Names of the snapshots to keep when the kernel ends (their disks stay)."""
        return [str(s["name"]) for s in self.meta().values() if s.get("keep")]

    def _meta_path(self) -> Path | None:
        return self.prov.state_dir / "snapshots.json" if self.prov.has_state_dir else None

    def _save(self, meta: dict[str, dict[str, Any]]) -> None:
        (self.prov.state_dir / "snapshots.json").write_text(json.dumps(meta))

    async def list(self) -> list[Snapshot]:
        """The snapshots libvirt (memory) and the disk images (disk) have, with our metadata."""
        meta = self.meta()
        present = await self.prov.machine_now().snapshot_names(
            disk=any(m.get("kind") == "disk" for m in meta.values()))
        return [Snapshot(name=n, kind=m.get("kind", "memory"), created=m["created"], size=None,
                         keep=bool(m.get("keep"))) for n, m in meta.items() if n in present]

    async def create(self, name: str, kind: str, keep: bool) -> Snapshot:
        """A memory snapshot (recording the kernel's pid and ports) or a disk-only one."""
        prov = self.prov
        machine = prov.machine_now()
        snap = Snapshot(name=name, kind=kind, keep=keep)
        entry: dict[str, Any] = snap.to_dict()
        if kind == "disk":
            # Crash-consistent at least: flush the guest's page cache first.
            kernel = await prov.remote_kernel()
            await to_thread(kernel.shell.run, ["sync"], None, prov.job_completion_timeout)
            entry["files"] = await machine.snapshot(name, prov.job_completion_timeout, memory=False)
        else:
            await machine.snapshot(name, prov.job_completion_timeout)
            state = prov.kernel_state
            entry.update(pid=state.pid, ports=dict(state.ports), preloader_pid=state.preloader_pid)
        meta = self.meta()
        meta[name] = entry
        self._save(meta)
        return snap

    async def rollback(self, snapshot: Snapshot) -> bool:
        """Revert to the snapshot; returns whether the kernel was restarted (disk kind)."""
        prov = self.prov
        meta = self.meta()[snapshot.name]
        if snapshot.kind == "disk":
            await self._rollback_disk(snapshot.name, meta["files"])
            return True
        # The guest's random generator is the snapshot's again: the machine gives it fresh bytes.
        await prov.machine_now().rollback(snapshot.name, prov.job_completion_timeout,
                                          prov.ssh_ready_timeout)
        tunnel = await prov.tunnel_ready()
        await to_thread(tunnel.reconnect, prov.ssh_ready_timeout)
        kernel = await prov.remote_kernel()
        await kernel.adopt(KernelState.from_dict(meta), prov.channel_ports, prov.client_sockets())
        return False

    async def _rollback_disk(self, name: str, files: list[str]) -> None:
        """Power the VM off, restore its disks, boot it again and start the kernel.

        The domain comes back with the same configuration (ports, seed, keys), so the tunnel
        and its local ports stay; the kernel is forgotten (its forwards held) until the new
        one listens.
        """
        prov = self.prov
        if prov.kernel is not None:
            await prov.kernel.forget()
        else:
            prov.kernel_state.pid = prov.kernel_state.preloader_pid = None
        await prov.machine_now().rollback_disks(name, files, prov.job_completion_timeout)
        tunnel = await prov.tunnel_ready()
        await prov.wait_for_ssh(lambda: to_thread(tunnel.reconnect, 10))
        await prov.relaunch_kernel()

    async def delete(self, snapshot: Snapshot) -> None:
        """Delete the snapshot from libvirt (memory) or from the disk images (disk)."""
        await self.prov.machine_now().delete_snapshot(snapshot.name, memory=snapshot.kind != "disk")
        meta = self.meta()
        meta.pop(snapshot.name, None)
        self._save(meta)
