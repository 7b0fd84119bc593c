"""Libvirt runtime: "Python (NixOS VM)", one QEMU virtual machine per kernel (``sandbox-nixos-vm``).

Each kernel gets a copy-on-write overlay of the base image, a seed disk with fresh per-kernel
SSH keys (client key, and the guest host key that is pinned), direct kernel boot, and QEMU
user-mode networking whose only way in is the guest's port 22 forwarded to 127.0.0.1. The
kernel is then started and reached over SSH exactly as on an SSH host. Snapshots are internal
qcow2 snapshots: of the running domain with its memory (libvirt), or of its disks alone
(``snapshots.py``); a VM can start from a golden memory snapshot (``golden_start.py``). The VM
itself is a :class:`~.machine.Machine`, assembled by :func:`~.machine.assemble`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from traitlets import Bool, Float, Int, List, Unicode, default, validate

from ...aio import to_thread
from ...cache import cache_dir
from ...errors import SandboxConfigError, SandboxError, SandboxUnavailable
from ...images.guest_os import guest_os
from ...settings import check_name, env_default, parse_size
from ...ssh.keys import create_sandbox_keys, load_private_key
from ...remote.ssh_provisioner import SSHKernelProvisioner
from ...snapshots.model import Capabilities, Snapshot
from ...ssh.dialed import DialedAhead
from ...ssh.tunnel import SSHTunnel
from . import golden, image_policy, overlay, pool_hooks
from .domain_xml import check_cmdline_word, check_memory_mib, check_vcpus
from .boot import console_tail
from .golden_start import GoldenStart
from .libvirt_conn import LibvirtHost
from .machine import CONSOLE_LINES, Machine, assemble
from .machine_parts import MachineConfig, MachineKeys, remove_files
from .slots import VMSlot
from .snapshots import CAPABILITIES, VMSnapshots


class LibvirtProvisioner(SSHKernelProvisioner):
    """Runs the kernel in its own libvirt/QEMU VM, reached only over SSH."""

    runtime = "libvirt"
    kernel_name = "sandbox-nixos-vm"
    supports_pool = True

    base_image = Unicode(config=True, help="Base qcow2 image. Env: NIXOS_SANDBOX_BASE_IMAGE.")
    guest_kernel = Unicode("", config=True, help="Kernel for direct boot (default: <image>.vmlinuz).")
    guest_initrd = Unicode("", config=True, help="Initrd for direct boot (default: <image>.initrd).")
    images_dir = Unicode(config=True,
                         help="Where per-kernel overlays go. Env: NIXOS_EPHEMERAL_VM_IMAGES_DIR.").tag(widen="admin")
    workspace_dir = Unicode(config=True,
                            help="Persistent workspace disks. Env: NIXOS_WORKSPACE_VM_IMAGES_DIR.").tag(widen="admin")
    workspace = Unicode("", config=True,
                        help="Name of a persistent workspace disk mounted at the working directory.")
    workspace_size = Unicode("4g", config=True, help="Size of a new workspace disk.")
    memory_mb = Int(512, config=True, help="Guest memory in MiB. Env: NIXOS_VM_DEFAULT_MEMORY_MB.")
    _memory_mb_default = env_default("memory_mb", "NIXOS_VM_DEFAULT_MEMORY_MB")
    vcpus = Int(1, config=True, help="Guest CPUs. Env: NIXOS_VM_DEFAULT_VCPUS.")
    _vcpus_default = env_default("vcpus", "NIXOS_VM_DEFAULT_VCPUS")
    max_concurrent_vms = Int(2, config=True,
                             help="VMs at once on this host; more kernels wait. Env: NIXOS_MAX_CONCURRENT_VMS.").tag(widen="higher")
    _max_concurrent_vms_default = env_default("max_concurrent_vms", "NIXOS_MAX_CONCURRENT_VMS")
    _pool_size_default = env_default("pool_size", "NIXOS_VM_POOL_SIZE")
    queue_timeout = Float(3600.0, config=True, help="Seconds a kernel may wait for a VM slot.")
    ssh_key_path = Unicode("", config=True,
                           help="A static client key instead of a fresh one per VM. Env: NIXOS_VM_SSH_KEY_PATH.").tag(widen="admin")
    _ssh_key_path_default = env_default("ssh_key_path", "NIXOS_VM_SSH_KEY_PATH")
    ssh_user = Unicode("executor", config=True, help="Guest user. Env: NIXOS_VM_SSH_USER.")
    _ssh_user_default = env_default("ssh_user", "NIXOS_VM_SSH_USER")
    ssh_ready_timeout = Float(120.0, config=True,
                              help="Seconds for the guest's sshd to answer. Env: NIXOS_VM_SSH_READY_TIMEOUT.")
    _ssh_ready_timeout_default = env_default("ssh_ready_timeout", "NIXOS_VM_SSH_READY_TIMEOUT")
    job_completion_timeout = Float(300.0, config=True,
                                   help="Seconds a snapshot or rollback may take. Env: NIXOS_JOB_COMPLETION_TIMEOUT.")
    _job_completion_timeout_default = env_default("job_completion_timeout", "NIXOS_JOB_COMPLETION_TIMEOUT")
    enabled = Bool(True, config=True, help="Allow VM kernels on this server. Env: NIXOS_SANDBOX_ENABLED.").tag(widen="true")
    _enabled_default = env_default("enabled", "NIXOS_SANDBOX_ENABLED")
    accelerator = Unicode("auto", config=True,
                          help="'auto' (probe KVM, fall back to TCG), 'kvm' or 'qemu'. Env: SANDBOX_KERNELS_VM_ACCEL.")
    _accelerator_default = env_default("accelerator", "SANDBOX_KERNELS_VM_ACCEL")
    allow_network = Bool(False, config=True,
                         help="Let the guest open outbound connections, through a NIC of its own "
                              "served by passt as user sandbox-kernels-net, which an nftables "
                              "rule keeps off this machine's addresses (needs a root server).").tag(widen="true")
    fresh_vm_on_restart = Bool(False, config=True, help="Restart the kernel in a new VM, not the same one.")
    preload = Bool(True, config=True,
                   help="Keep a process in the VM that has imported ipykernel and fork each kernel "
                        "from it: a restart costs a fork instead of an import (10-15 s under TCG). "
                        "Used when the kernelspec runs `python -m ipykernel_launcher`.")
    golden_snapshot = Bool(True, config=True,
                           help="Start the VM from this configuration's golden memory snapshot "
                                "(a booted guest with ipykernel imported) when one has been built "
                                "with `sandbox-kernels vm golden`, instead of booting it. "
                                "Env: NIXOS_VM_GOLDEN_SNAPSHOT.")
    _golden_snapshot_default = env_default("golden_snapshot", "NIXOS_VM_GOLDEN_SNAPSHOT")
    libvirt_uri = Unicode("qemu:///system", config=True, help="libvirt connection URI.").tag(widen="admin")
    image_dirs = List(Unicode(), config=True,
                      help="Directories base images, guest kernels and backing files may come from "
                           "(default: the image cache, /var/lib/sandbox-kernels/images and the "
                           "directory of NIXOS_SANDBOX_BASE_IMAGE). Env: SANDBOX_KERNELS_VM_IMAGE_DIRS "
                           "(os.pathsep-separated).").tag(widen="subset")
    extra_cmdline = List(Unicode(), config=True,
                         help="Extra guest kernel command-line words (e.g. 'console=ttyS0').")

    @validate("extra_cmdline")
    def _check_cmdline(self, proposal: dict[str, Any]) -> list[str]:
        return [check_cmdline_word(word) for word in proposal["value"]]

    @default("base_image")
    def _default_base(self) -> str:
        return os.environ.get("NIXOS_SANDBOX_BASE_IMAGE") or str(cache_dir() / "vm" / "debian-guest.qcow2")

    @default("images_dir")
    def _default_images(self) -> str:
        return os.environ.get("NIXOS_EPHEMERAL_VM_IMAGES_DIR") or str(cache_dir() / "ephemeral")

    @default("workspace_dir")
    def _default_workspaces(self) -> str:
        return os.environ.get("NIXOS_WORKSPACE_VM_IMAGES_DIR") or str(cache_dir() / "workspaces")

    @default("image_dirs")
    def _default_image_dirs(self) -> list[str]:
        configured = os.environ.get(image_policy.ENV, "")
        if configured:
            return [d for d in configured.split(os.pathsep) if d]
        return image_policy.default_dirs(os.environ.get("NIXOS_SANDBOX_BASE_IMAGE") or None)

    @default("launch_timeout")
    def _default_launch_timeout(self) -> float:
        return float(os.environ.get("SANDBOX_KERNELS_LAUNCH_TIMEOUT") or self.ssh_ready_timeout + 60)

    @validate("memory_mb")
    def _check_memory(self, proposal: dict[str, Any]) -> int:
        return check_memory_mib(proposal["value"])

    @validate("vcpus")
    def _check_vcpus(self, proposal: dict[str, Any]) -> int:
        return check_vcpus(proposal["value"])

    @validate("max_concurrent_vms")
    def _check_max(self, proposal: dict[str, Any]) -> int:
        if proposal["value"] < 1:
            raise SandboxConfigError("max_concurrent_vms (NIXOS_MAX_CONCURRENT_VMS) must be 1 or more.")
        return int(proposal["value"])

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._host: LibvirtHost | None = None
        self._slot: VMSlot | None = None
        #: The kernel's VM, once assembled (see :meth:`assemble_machine`).
        self.machine: Machine | None = None
        self.ssh_port: int | None = None
        #: A pool member's connection to its sshd dialed ahead; the claimer's, received.
        self.ssh_ahead: DialedAhead | None = None
        self._keys: dict[str, str] = {}
        #: How the VM started: "boot", or "golden" (restored from a golden snapshot).
        self.start_mode = ""
        #: Golden-snapshot starts and builds, and the kernel's snapshots (collaborators that
        #: use this provisioner's public names).
        self.golden = GoldenStart(self)
        self.snapshots = VMSnapshots(self)

    # -- settings ---------------------------------------------------------------------------

    def validate_settings(self) -> None:
        """Refuse a disabled runtime, bad names, and image paths outside the allowed directories."""
        super().validate_settings()
        if not self.enabled:
            raise SandboxUnavailable(
                "VM kernels are disabled on this server (NIXOS_SANDBOX_ENABLED is false).")
        if self.workspace:
            check_name(self.workspace, "workspace")
        if self.ssh_user:
            check_name(self.ssh_user, "ssh_user")
        dirs = image_policy.allowed_dirs(self.image_dirs)
        image_policy.check_path(self.base_image, "base_image", dirs)
        for setting in ("guest_kernel", "guest_initrd"):
            if getattr(self, setting):
                image_policy.check_path(getattr(self, setting), setting, dirs)

    @property
    def kernel_path(self) -> str:
        """The guest kernel for direct boot."""
        return self.guest_kernel or str(Path(self.base_image).with_suffix(".vmlinuz"))

    @property
    def initrd_path(self) -> str | None:
        """The guest's initrd, if any."""
        if self.guest_initrd:
            return self.guest_initrd
        path = Path(self.base_image).with_suffix(".initrd")
        return str(path) if path.exists() else None

    @property
    def vm_dir(self) -> Path:
        """The VM's own directory: overlay, seed, console log, QEMU's sockets (QEMU may search it)."""
        return Path(self.images_dir) / self.sandbox_id

    @property
    def console_path(self) -> Path:
        """The serial console log (written by virtlogd for the guest; read by bounded tails)."""
        return self.vm_dir / "console.log"

    def sandbox_description(self) -> str:
        """The guest OS of the base image (from its os-release record)."""
        return guest_os(self.base_image).describe()

    def remote_dir(self) -> str:
        """One kernel per VM: a fixed directory in the guest."""
        return "/tmp/sandbox-kernel"

    def remote_cwd(self) -> str | None:
        """The workspace when one is attached, else the executor's home."""
        home = f"/home/{self.ssh_user}"
        return f"{home}/work" if self.workspace else home

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        """Take a VM slot first (waiting in line if all are in use)."""
        kwargs = await super().pre_launch(**kwargs)
        try:
            await self.take_slot(f"kernel {self.kernel_id}")
        except SandboxError as e:
            self.start_progress.phase("failed", str(e))
            raise
        return kwargs

    async def take_slot(self, purpose: str) -> None:
        """Hold one of this host's VM slots (waiting in line if all are in use) until the VM
        is destroyed; ``purpose`` names the waiter in the log."""
        if self._slot is None:
            self._slot = await pool_hooks.take_slot(self, purpose)

    async def build_golden(self, rebuild: bool = False) -> golden.Golden:
        """Build this configuration's golden snapshot (see :meth:`GoldenStart.build`); the
        provisioner is torn down after."""
        return await self.golden.build(rebuild)

    # -- snapshots (see snapshots.py) -----------------------------------------------------------

    def snapshot_capabilities(self) -> Capabilities:
        """Memory snapshots (live, the default) and disk-only snapshots."""
        return CAPABILITIES

    async def snapshot_list(self) -> list[Snapshot]:
        """The VM's snapshots."""
        return await self.snapshots.list()

    async def snapshot_create(self, name: str, kind: str, keep: bool) -> Snapshot:
        """A memory or disk snapshot of the VM."""
        return await self.snapshots.create(name, kind, keep)

    async def snapshot_rollback(self, snapshot: Snapshot) -> bool:
        """Revert the VM; returns whether the kernel was restarted (disk kind)."""
        return await self.snapshots.rollback(snapshot)

    async def snapshot_delete(self, snapshot: Snapshot) -> None:
        """Delete one of the VM's snapshots."""
        await self.snapshots.delete(snapshot)

    # -- the VM ---------------------------------------------------------------------------------

    async def _libvirt(self) -> LibvirtHost:
        if self._host is None:
            self._host = LibvirtHost(self.libvirt_uri)
            await to_thread(self._host.connect)
        return self._host

    async def assemble_machine(self) -> Machine:
        """Check the images against the policy, make the keys and the workspace, and assemble
        the VM as these settings describe it (nothing is started)."""
        await to_thread(image_policy.check_image, self.base_image, "base_image",
                        image_policy.allowed_dirs(self.image_dirs))
        host = await self._libvirt()
        keys = await to_thread(self._make_keys)
        workspace = None
        if self.workspace:
            workspace = str(await to_thread(overlay.create_workspace, self.workspace_dir,
                                            parse_size(self.workspace_size, "workspace_size"),
                                            f"{self.workspace}.qcow2"))
        self.machine = await to_thread(assemble, self._machine_config(workspace), keys, host, self.log)
        self.ssh_port = self.machine.ssh_port
        self.log.debug("Kernel %s: VM domain type %s (%s)", self.kernel_id,
                       self.machine.spec.domain_type, self.machine.accel.reason if self.machine.accel else "")
        return self.machine

    def _machine_config(self, workspace: str | None) -> MachineConfig:
        return MachineConfig(
            machine_id=self.sandbox_id, vm_dir=self.vm_dir, base_image=self.base_image,
            kernel=self.kernel_path, initrd=self.initrd_path, hostname=f"sandbox-{self.sandbox_id[:8]}",
            accelerator=self.accelerator, memory_mib=self.memory_mb, vcpus=self.vcpus,
            allow_network=self.allow_network, workspace=workspace,
            extra_cmdline=tuple(self.extra_cmdline), labels=self.labels)

    def _make_keys(self) -> MachineKeys:
        """Fresh host and client keys in the state directory (or the static client key)."""
        keys = create_sandbox_keys(self.state_dir / "ssh", self.sandbox_id[:32])
        if self.ssh_key_path:
            path = os.path.expanduser(self.ssh_key_path)
            client = load_private_key(path)
            authorized = f"{client.get_name()} {client.get_base64()}"
        else:
            path, authorized = str(keys.client_key_path), keys.client.public_line
        self._keys = {"client": path, "host_public": keys.host.public_line}
        return MachineKeys(keys.host.private_openssh, keys.host.public_line, authorized, path)

    async def create_sandbox(self) -> None:
        """Assemble the VM, then wait for the guest's sshd.

        With a golden snapshot for this configuration the VM is restored from it (and its
        preloader is ready); without one, or if the restore fails, it boots.
        """
        self.kernel_state.preloader_pid = None  # a new machine has none yet
        self.start_mode = "boot"
        machine = await self.assemble_machine()
        self.log.info("Kernel %s: VM guest %s; serial console log %s", self.kernel_id,
                      self.sandbox_description(), machine.console)
        if await self.golden.restore(machine):
            self.start_mode = "golden"
            return
        self.start_progress.phase("booting", "booting the VM")
        await machine.boot()
        self.ssh_port = machine.ssh_port
        self.start_progress.phase("connecting", "waiting for the VM's SSH server")
        self.tunnel = await self.wait_for_ssh()

    async def wait_for_ssh(self, connect: Any = None) -> Any:
        """Wait for the booted guest, then until ``connect`` (default: open the tunnel) works."""
        assert self.machine is not None
        return await self.machine.wait_ssh(connect or self.open_tunnel, self.ssh_ready_timeout,
                                           "NIXOS_VM_SSH_READY_TIMEOUT")

    def machine_now(self) -> Machine:
        """The kernel's machine; re-made from the saved state after a re-attach."""
        if self.machine is None:
            if self._host is None:
                self._host = LibvirtHost(self.libvirt_uri)
            keys = MachineKeys("", self._keys.get("host_public", ""), "", self._keys.get("client"))
            workspace = str(Path(self.workspace_dir) / f"{self.workspace}.qcow2") if self.workspace else None
            self.machine = Machine.existing(self._machine_config(workspace), keys, self._host,
                                            int(self.ssh_port or 0), self.log)
        return self.machine

    async def open_tunnel(self) -> SSHTunnel:
        """Connect to the forwarded port with the per-kernel key, pinning the seeded host key."""
        dialed = self.ssh_ahead.take(self.ssh_port) if self.ssh_ahead is not None and self.ssh_port else None
        return await self.machine_now().open_tunnel(self.ssh_user, self.ssh_ready_timeout, self.log, dialed)

    def preload_kernels(self) -> bool:
        """Fork kernels from a preloaded process (the VM goes with the kernel)."""
        return self.preload

    async def sandbox_alive(self) -> bool:
        """The domain is running (or paused for a snapshot)."""
        host = await self._libvirt()
        return await to_thread(host.state, self.sandbox_name) in ("running", "paused")

    async def keep_sandbox_on_restart(self) -> bool:
        """Same VM unless fresh_vm_on_restart is set or the VM is gone (a guest panic, say)."""
        return not self.fresh_vm_on_restart and await self.sandbox_alive()

    async def diagnostics(self) -> str:
        """Kernel log and serial console tails."""
        parts = [await super().diagnostics()]
        if self.kernel_id:
            console = self.console_path
            if console.exists():
                parts.append(f"Serial console:\n{console_tail(console, CONSOLE_LINES)}")
        return "\n".join(p for p in parts if p)

    # -- warm pools (see pool_hooks.py) -------------------------------------------------------

    async def release_sandbox(self) -> list[int]:
        """Close the tunnel and the libvirt connection; the VM runs on for the process that
        claims it, which gets the VM slot's lock."""
        await self.close_tunnel()
        self.machine = None
        if self._host is not None:
            await to_thread(self._host.close)
            self._host = None
        slot, self._slot = self._slot, None
        return pool_hooks.hand_over_fds(slot, self.ssh_ahead)

    def take_over(self, fds: list[int]) -> None:
        """Hold the claimed VM's slot, and log in over the connection dialed ahead."""
        self._slot, self.ssh_ahead = pool_hooks.adopt_fds(fds)

    async def keep_warm(self) -> None:
        """Keep a connection to the guest's sshd dialed ahead (its banner waiting)."""
        if self.ssh_port:
            if self.ssh_ahead is None:
                self.ssh_ahead = DialedAhead("127.0.0.1", self.ssh_port)
            await to_thread(self.ssh_ahead.refresh)

    async def pool_identity(self) -> dict[str, Any]:
        """The images' file identities: a rebuilt image is a new pool."""
        return await to_thread(pool_hooks.identity, self)

    async def memory_held(self) -> int:
        """The QEMU process's resident memory."""
        return await to_thread(pool_hooks.qemu_memory, self.sandbox_name)

    async def destroy_sandbox(self) -> None:
        """Destroy and undefine the domain, remove overlay and seed, free the slot.

        The domain is powered off at once; a persistent workspace is synced first, or files
        the kernel wrote in its last seconds would be lost with the guest's page cache.
        """
        if self.workspace and self.tunnel is not None:
            try:
                await to_thread(self.tunnel.run, ["sync"], None, 30)
            except SandboxError as e:
                self.log.warning("Kernel %s: could not sync workspace %r before power-off: %s",
                                 self.kernel_id, self.workspace, e)
        await self.close_tunnel()
        if self.ssh_ahead is not None:
            self.ssh_ahead.close()
        machine, self.machine = self.machine, None
        try:
            host = await self._libvirt()
            if machine is not None:
                await machine.destroy()
            else:
                await to_thread(host.destroy, self.sandbox_name)
            await to_thread(host.close)
        except SandboxError as e:
            self.log.warning("Kernel %s: could not remove VM %s: %s (`sandbox-kernels reap` will)",
                             self.kernel_id, self.sandbox_name, e)
        self._host = None
        kept = self.snapshots.kept()
        if kept:
            self.log.info("Kernel %s: keeping overlay %s with snapshots %s", self.kernel_id,
                          self.vm_dir, kept)
        await to_thread(remove_files, self.vm_dir, bool(kept))
        if self._slot is not None:
            self._slot.release()
            self._slot = None
        self.pid = None

    def runtime_state(self) -> dict[str, Any]:
        """SSH port and key paths in addition to the kernel's state."""
        return {**super().runtime_state(), "ssh_port": self.ssh_port, "keys": self._keys}

    def load_runtime_state(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`runtime_state`."""
        super().load_runtime_state(state)
        self.ssh_port = state.get("ssh_port")
        self._keys = state.get("keys", {})
