"""Golden-snapshot starts for the VM runtime (the store and the reseed are in golden.py).

A mixin of :class:`~sandbox_kernels.runtimes.vm.provisioner.LibvirtProvisioner`: it builds a
golden snapshot from a VM booted as the kernelspec configures it, and starts a kernel's VM by
restoring one; the VM itself is the provisioner's :class:`~.machine.Machine`.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from importlib import resources
from pathlib import Path
from typing import Any

from ...aio import to_thread
from ...errors import SandboxConfigError, SandboxError, SandboxStartError
from ...provisioning.base import _shielded, _track
from . import golden
from .domain_xml import DomainSpec
from .machine import Machine
from .slots import acquire_slot, slots_dir

#: Wait (in the guest) until the preloader has imported ipykernel; exit 3 with its log if it died.
_WAIT_PRELOADED = r"""
log=$1 pid=$2
while kill -0 "$pid" 2>/dev/null; do
    grep -q '^preloaded' "$log" 2>/dev/null && exit 0
    sleep 0.1
done
tail -c 8192 "$log"  # written in the guest: a bounded tail
exit 3
"""


class GoldenStart:
    """Golden snapshots: restore a kernel's VM from one, or build one."""

    # Provided by LibvirtProvisioner and its bases.
    kernel_spec: Any
    log: Any

    def _golden_eligible(self) -> bool:
        """Golden snapshots serve preloaded kernels in VMs without a workspace disk."""
        argv = list(self.kernel_spec.argv) if self.kernel_spec is not None else []
        return (self.golden_snapshot and self.preload and not self.workspace
                and argv[1:3] == ["-m", "ipykernel_launcher"])

    def _golden_env(self) -> dict[str, str]:
        """The preloader's environment in a golden VM: the kernelspec's, nothing per kernel."""
        env = dict(self.kernel_spec.env or {}) if self.kernel_spec is not None else {}
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def _golden_key(self, spec: DomainSpec) -> str:
        """The key of the golden snapshot a VM with ``spec`` can be restored from."""
        script = resources.files("sandbox_kernels.guest").joinpath("kernel_preloader.py").read_bytes()
        inputs = {
            "base": golden.file_identity(self.base_image),
            "kernel": golden.file_identity(spec.kernel),
            "initrd": golden.file_identity(spec.initrd) if spec.initrd else None,
            "domain_type": spec.domain_type, "memory_mib": spec.memory_mib, "vcpus": spec.vcpus,
            # The outbound NIC (passt) is part of the machine a clone must match.
            "cmdline": spec.cmdline, "network": "passt" if spec.allow_network else False,
            "user": self.ssh_user,
            "python": self.kernel_spec.argv[0], "env": self._golden_env(),
            "preloader": hashlib.sha256(script).hexdigest(), "cwd": self.remote_cwd(),
        }
        self._golden_inputs = inputs
        return golden.golden_key(inputs)

    async def start_from_golden(self, machine: Machine) -> bool:
        """Restore ``machine`` from this configuration's golden snapshot, if there is one.

        Returns:
            Whether it was restored (and logged in): if not, the machine is ready to boot.
        """
        if not self._golden_eligible():
            return False
        found = await to_thread(golden.load, self._golden_key(machine.spec))
        if found is None:
            self.log.info("Kernel %s: no golden snapshot for this VM configuration; booting "
                          "(`sandbox-kernels vm golden` makes VM starts several times faster)",
                          self.kernel_id)
            return False
        started = time.monotonic()
        try:
            steps = await machine.restore(found, self.ssh_ready_timeout)
            self.ssh_port = machine.ssh_port
            waited = time.monotonic()
            self.tunnel = await self.wait_for_ssh()
        except (SandboxError, OSError) as e:
            self.log.warning("Kernel %s: could not start from golden snapshot %s (%s); booting "
                             "instead", self.kernel_id, found.key, e)
            await self.close_tunnel()
            await machine.reset()
            return False
        self._preloader_pid = found.preloader_pid
        self.log.info("Kernel %s: VM restored from golden snapshot %s in %.2f s (copy %.2f, "
                      "revert %.2f, reseed %.2f, ssh %.2f)", self.kernel_id, found.key,
                      time.monotonic() - started, steps["copy"], steps["revert"], steps["reseed"],
                      time.monotonic() - waited)
        return True

    async def build_golden(self, rebuild: bool = False) -> golden.Golden:
        """Boot a VM, start the preloader in it, and keep its memory snapshot as the golden one.

        Call on a provisioner configured like the kernelspec it serves, with a kernel id of
        its own (the VM is named and labelled like any other, so a crash leaves nothing that
        `sandbox-kernels reap` cannot remove). A second builder of the same key waits for the
        first and returns its result. ``rebuild``: build it anew even if it exists.

        Raises:
            SandboxConfigError: this configuration cannot use golden snapshots.
            SandboxError / SandboxTimeout: the VM did not boot or the preloader failed.
        """
        self.validate_settings()
        _track(self)  # removed at interpreter exit if this is interrupted
        if not self._golden_eligible():
            raise SandboxConfigError(
                "golden snapshots need golden_snapshot and preload on, no workspace, and a "
                "kernelspec that runs `python -m ipykernel_launcher`.")
        self._slot = await acquire_slot(slots_dir(), self.max_concurrent_vms, self.queue_timeout,
                                        self.log, f"golden snapshot build {self.kernel_id}")
        try:
            machine = await self.assemble_machine()
            key = self._golden_key(machine.spec)
            with golden.build_lock(key):
                if rebuild:
                    await to_thread(golden.remove, key)
                existing = await to_thread(golden.load, key)
                if existing is not None:
                    return existing
                return await self._build_golden(machine, key)
        finally:
            await _shielded(self._teardown())

    async def _build_golden(self, machine: Machine, key: str) -> golden.Golden:
        spec = machine.spec
        self.log.info("Golden snapshot %s: booting the VM", key)
        await machine.boot()
        self.ssh_port = machine.ssh_port
        self.tunnel = await self.wait_for_ssh()
        tunnel = await self._tunnel_ready()
        rdir = self.remote_dir()
        await self._remote(tunnel.run, ["mkdir", "-p", "-m", "700", rdir], None, 30)
        self.log.info("Golden snapshot %s: importing ipykernel in the guest", key)
        await self._start_preloader(tunnel, self.kernel_spec.argv[0], self._golden_env())
        result = await self._remote(tunnel.run, ["sh", "-c", _WAIT_PRELOADED, "sandbox-kernels-preload",
                                                 f"{rdir}/preloader.log", str(self._preloader_pid)],
                                    None, self.launch_timeout)
        if result.exit_code != 0:
            raise SandboxStartError(f"the kernel preloader failed in the golden VM. Its log:\n"
                                    f"{result.stdout.decode(errors='replace')}")
        await self.close_tunnel()
        # Every clone will be told to reseed: check now that this image's guest can (an image
        # without the agent would make each clone wait for the timeout before it boots).
        try:
            await to_thread(golden.reseed, str(spec.reseed_socket), 60)
        except SandboxError as e:
            raise SandboxStartError(
                f"the guest does not reseed ({e}): its image lacks the reseed agent of the guest "
                "contract (see sandbox-init / the NixOS recipe); rebuild it, or set "
                "golden_snapshot false.") from e
        await asyncio.sleep(0.5)  # let the guest end the SSH sessions before the snapshot
        self.log.info("Golden snapshot %s: saving the VM's memory", key)
        await machine.snapshot(golden.SNAPSHOT, self.job_completion_timeout)
        snapshot_xml = (await to_thread(machine.host.snapshot_xmls, machine.name))[0]
        await machine.destroy()
        saved = await to_thread(golden.save, key, Path(spec.root), snapshot_xml,
                                int(self._preloader_pid or 0), self._golden_inputs)
        self.log.info("Golden snapshot %s saved (%d MiB)", key, saved.root.stat().st_size >> 20)
        return saved
