"""Golden-snapshot starts for the VM runtime (the store and the reseed are in golden.py).

:class:`GoldenStart` is held by :class:`~sandbox_kernels.runtimes.vm.provisioner.LibvirtProvisioner`
(``provisioner.golden``) and reads it through its public names only: it builds a golden
snapshot from a VM booted as the kernelspec configures it, and starts a kernel's
:class:`~.machine.Machine` by restoring one.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...aio import to_thread
from ...errors import SandboxConfigError, SandboxError, SandboxStartError
from ...provisioning.exit_cleanup import shielded, track
from . import golden
from .domain_xml import DomainSpec
from .machine import Machine

if TYPE_CHECKING:
    from .provisioner import LibvirtProvisioner

#: Wait (in the guest) until the preloader has imported ipykernel; exit 3 with its log if it died.
WAIT_PRELOADED = r"""
log=$1 pid=$2
while kill -0 "$pid" 2>/dev/null; do
    grep -q '^preloaded' "$log" 2>/dev/null && exit 0
    sleep 0.1
done
tail -c 8192 "$log"  # written in the guest: a bounded tail
exit 3
"""


class GoldenStart:
    """Golden snapshots of one provisioner's VM configuration: restore from one, or build one.

    Attributes:
        inputs: what the last computed key was made of (saved with a built snapshot).
    """

    def __init__(self, provisioner: LibvirtProvisioner) -> None:
        self.prov = provisioner
        self.inputs: dict[str, Any] = {}

    def eligible(self) -> bool:
        """Golden snapshots serve preloaded kernels in VMs without a workspace disk."""
        prov = self.prov
        argv = list(prov.kernel_spec.argv) if prov.kernel_spec is not None else []
        return (prov.golden_snapshot and prov.preload and not prov.workspace
                and argv[1:3] == ["-m", "ipykernel_launcher"])

    def env(self) -> dict[str, str]:
        """The preloader's environment in a golden VM: the kernelspec's, nothing per kernel."""
        spec = self.prov.kernel_spec
        env = dict(spec.env or {}) if spec is not None else {}
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def key(self, spec: DomainSpec) -> str:
        """The key of the golden snapshot a VM with ``spec`` can be restored from."""
        prov = self.prov
        script = resources.files("sandbox_kernels.guest").joinpath("kernel_preloader.py").read_bytes()
        self.inputs = {
            "base": golden.file_identity(prov.base_image),
            "kernel": golden.file_identity(spec.kernel),
            "initrd": golden.file_identity(spec.initrd) if spec.initrd else None,
            "domain_type": spec.domain_type, "memory_mib": spec.memory_mib, "vcpus": spec.vcpus,
            # The outbound NIC (passt) is part of the machine a clone must match.
            "cmdline": spec.cmdline, "network": "passt" if spec.allow_network else False,
            "user": prov.ssh_user,
            "python": prov.kernel_spec.argv[0], "env": self.env(),
            "preloader": hashlib.sha256(script).hexdigest(), "cwd": prov.remote_cwd(),
        }
        return golden.golden_key(self.inputs)

    async def restore(self, machine: Machine) -> bool:
        """Restore ``machine`` from this configuration's golden snapshot, if there is one, and
        log in (the provisioner's tunnel).

        Returns:
            Whether it was restored; if not, the machine is ready to boot.
        """
        prov = self.prov
        if not self.eligible():
            return False
        found = await to_thread(golden.load, self.key(machine.spec))
        if found is None:
            prov.log.info("Kernel %s: no golden snapshot for this VM configuration; booting "
                          "(`sandbox-kernels vm golden` makes VM starts several times faster)",
                          prov.kernel_id)
            return False
        started = time.monotonic()
        progress = prov.start_progress
        try:
            progress.phase("restoring", "restoring the VM from its golden snapshot")
            steps = await machine.restore(found, prov.ssh_ready_timeout, on_reseed=lambda: progress.phase(
                "reseeding", "giving the VM its own keys (reseed)"))
            prov.ssh_port = machine.ssh_port
            waited = time.monotonic()
            progress.phase("connecting", "connecting to the VM over SSH")
            prov.tunnel = await prov.wait_for_ssh()
        except (SandboxError, OSError) as e:
            prov.log.warning("Kernel %s: could not start from golden snapshot %s (%s); booting "
                             "instead", prov.kernel_id, found.key, e)
            await prov.close_tunnel()
            await machine.reset()
            return False
        prov.kernel_state.preloader_pid = found.preloader_pid
        prov.log.info("Kernel %s: VM restored from golden snapshot %s in %.2f s (copy %.2f, "
                      "revert %.2f, reseed %.2f, ssh %.2f)", prov.kernel_id, found.key,
                      time.monotonic() - started, steps["copy"], steps["revert"], steps["reseed"],
                      time.monotonic() - waited)
        return True

    async def build(self, rebuild: bool = False) -> golden.Golden:
        """Boot a VM, start the preloader in it, and keep its memory snapshot as the golden one.

        The provisioner must be configured like the kernelspec it serves, with a kernel id of
        its own (the VM is named and labelled like any other, so a crash leaves nothing that
        `sandbox-kernels reap` cannot remove); it is torn down after. A second builder of the
        same key waits for the first and returns its result. ``rebuild``: build anew.

        Raises:
            SandboxConfigError: this configuration cannot use golden snapshots.
            SandboxError / SandboxTimeout: the VM did not boot or the preloader failed.
        """
        prov = self.prov
        prov.validate_settings()
        track(prov)  # removed at interpreter exit if this is interrupted
        if not self.eligible():
            raise SandboxConfigError(
                "golden snapshots need golden_snapshot and preload on, no workspace, and a "
                "kernelspec that runs `python -m ipykernel_launcher`.")
        try:
            await prov.take_slot(f"golden snapshot build {prov.kernel_id}")
            machine = await prov.assemble_machine()
            key = self.key(machine.spec)
            with golden.build_lock(key):
                if rebuild:
                    await to_thread(golden.remove, key)
                existing = await to_thread(golden.load, key)
                if existing is not None:
                    return existing
                return await self._build(machine, key)
        finally:
            await shielded(prov.teardown())

    async def _build(self, machine: Machine, key: str) -> golden.Golden:
        prov = self.prov
        spec = machine.spec
        prov.log.info("Golden snapshot %s: booting the VM", key)
        await machine.boot()
        prov.ssh_port = machine.ssh_port
        prov.tunnel = await prov.wait_for_ssh()
        kernel = await prov.remote_kernel()
        await kernel.prepare_dir()
        prov.log.info("Golden snapshot %s: importing ipykernel in the guest", key)
        preloader = await kernel.start_preloader(prov.kernel_spec.argv[0], self.env())
        result = await to_thread(kernel.shell.run, ["sh", "-c", WAIT_PRELOADED, "sandbox-kernels-preload",
                                                    f"{kernel.remote_dir}/preloader.log", str(preloader)],
                                 None, prov.launch_timeout)
        if result.exit_code != 0:
            raise SandboxStartError(f"the kernel preloader failed in the golden VM. Its log:\n"
                                    f"{result.stdout.decode(errors='replace')}")
        await prov.close_tunnel()
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
        prov.log.info("Golden snapshot %s: saving the VM's memory", key)
        await machine.snapshot(golden.SNAPSHOT, prov.job_completion_timeout)
        snapshot_xml = (await to_thread(machine.host.snapshot_xmls, machine.name))[0]
        await machine.destroy()
        saved = await to_thread(golden.save, key, Path(spec.root), snapshot_xml, int(preloader),
                                self.inputs)
        prov.log.info("Golden snapshot %s saved (%d MiB)", key, saved.root.stat().st_size >> 20)
        return saved
