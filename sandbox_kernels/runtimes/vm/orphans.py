"""The VM runtime's leftovers: domains whose owner is gone and stuck passt processes
(``reap``), overlay directories, and what a test session left (domains, passt)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from ... import labels
from ...errors import SandboxError
from ...reap import Orphan, OrphanFinder

if TYPE_CHECKING:
    from .libvirt_conn import LibvirtHost


class VMOrphans(OrphanFinder):
    """Domains named ``sandbox-kernels-<kernel id>`` at the settings' ``libvirt_uri``."""

    def _host(self) -> LibvirtHost:
        from .libvirt_conn import LibvirtHost

        return LibvirtHost(self.settings.libvirt_uri)

    def orphans(self) -> list[Orphan]:
        """Domains whose owner process (on this host) is gone, then passt processes (the
        outbound NICs of VMs with allow_network) whose VM is gone: passt exits when its QEMU
        does, so these are stuck ones."""
        try:
            host = self._host()
            names = host.list_domains()
            found = [Orphan("domain", name, lambda name=name: host.destroy(name),
                            name[len(labels.DOMAIN_PREFIX):])
                     for name in names
                     if not labels.owner_alive(host.labels(name), self.settings.state_root)]
        except SandboxError:
            found, names = [], []
        from . import outbound

        existing = {name[len(labels.DOMAIN_PREFIX):] for name in names}
        found += [Orphan("passt", f"pid {pid} (kernel {kid})",
                         lambda pid=pid, kid=kid: outbound.stop_process(pid, kid))
                  for pid, kid in outbound.leftover_processes() if kid not in existing]
        return found

    def existing(self) -> set[str]:
        """Kernel ids of every domain of ours, running or not."""
        try:
            names = self._host().list_domains()
        except SandboxError:
            return set()
        return {name[len(labels.DOMAIN_PREFIX):] for name in names}

    def directories(self) -> list[tuple[str, Path]]:
        """The state directories and the overlays' directory (``images_dir``)."""
        return super().directories() + [("overlay", Path(self.settings.images_dir))]

    def leaks(self, session: str) -> dict[str, list[str]]:
        """The session's domains, and passt processes whose log is under the state root."""
        try:
            with self._host() as host:
                domains = [n for n in host.list_domains() if host.labels(n).get(labels.SESSION) == session]
        except SandboxError:
            domains = []
        return {"domains": domains, "passt": self._passt()}

    def remove_leaks(self, leaks: dict[str, list[str]]) -> None:
        """``virsh destroy`` and ``undefine``; passt killed."""
        uri = self.settings.libvirt_uri
        for dom in leaks.get("domains", []):
            subprocess.run(["virsh", "-c", uri, "destroy", dom], capture_output=True, timeout=60)
            subprocess.run(["virsh", "-c", uri, "undefine", dom, "--snapshots-metadata"],
                           capture_output=True, timeout=60)
        from .outbound import stop_process

        for entry in leaks.get("passt", []):
            pid, kernel_id = entry.split(" ", 1)
            stop_process(int(pid), kernel_id)

    def _passt(self) -> list[str]:
        """passt processes of kernels under this state root, as "pid kernel-id"."""
        from .outbound import leftover_processes

        root = str(self.settings.state_root).encode()
        found = []
        for pid, kernel_id in leftover_processes():
            try:  # its log is in the kernel's state directory
                if root + b"/" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(f"{pid} {kernel_id}")
            except OSError:
                pass
        return found
