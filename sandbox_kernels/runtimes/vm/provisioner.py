"""Libvirt runtime: "Python (NixOS VM)", one QEMU virtual machine per kernel (``sandbox-nixos-vm``).

Each kernel gets a copy-on-write overlay of the base image, a seed disk with fresh per-kernel
SSH keys (client key, and the guest host key that is pinned), direct kernel boot, and QEMU
user-mode networking whose only way in is the guest's port 22 forwarded to 127.0.0.1. The
kernel is then started and reached over SSH exactly as on an SSH host. Snapshots are internal
qcow2 snapshots: of the running domain with its memory (libvirt), or of its disks alone
(``snapshots.py``); a VM can start from a golden memory snapshot (``golden_start.py``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from traitlets import Bool, Float, Int, List, Unicode, default, validate

from ...aio import to_thread
from ...cache import cache_dir
from .image import boot_cmdline
from ...errors import SandboxConfigError, SandboxError, SandboxStartError, SandboxTimeout, SandboxUnavailable
from ...settings import check_name, env_default
from ...ssh.keys import create_sandbox_keys, load_private_key
from ...ssh.tunnel import SSHTunnel
from . import golden, image_policy, overlay
from .access import ensure_emulator_access
from .accel import choose_domain_type
from .domain_xml import DomainSpec
from ...images.guest_os import guest_os
from .boot import console_tail, read_tail
from .libvirt_conn import LibvirtHost
from .outbound import OutboundLink
from .seed import write_seed_disk
from .slots import VMSlot, acquire_slot, slots_dir
from ..tunnelled import TunnelledProvisioner
from .golden_start import GoldenStart
from .snapshots import VMSnapshots


class LibvirtProvisioner(GoldenStart, VMSnapshots, TunnelledProvisioner):
    """Runs the kernel in its own libvirt/QEMU VM, reached only over SSH."""

    runtime = "libvirt"
    kernel_name = "sandbox-nixos-vm"

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
                           "directory of NIXOS_SANDBOX_BASE_IMAGE). Env: SANDBOX_KERNELS_VM_IMAGE_DIRS.").tag(widen="subset")
    extra_cmdline = List(Unicode(), config=True,
                         help="Extra guest kernel command-line words (e.g. 'console=ttyS0').")

    @validate("extra_cmdline")
    def _check_cmdline(self, proposal: dict[str, Any]) -> list[str]:
        for word in proposal["value"]:
            if not re.fullmatch(r"[A-Za-z0-9_.,:=/+-]{1,200}", word):
                raise SandboxConfigError(f"extra_cmdline word {word!r} has characters outside [A-Za-z0-9_.,:=/+-].")
        return list(proposal["value"])

    @default("base_image")
    def _default_base(self) -> str:
        return os.environ.get("NIXOS_SANDBOX_BASE_IMAGE") or str(cache_dir() / "vm" / "debian-guest.qcow2")

    @default("images_dir")
    def _default_images(self) -> str:
        return os.environ.get("NIXOS_EPHEMERAL_VM_IMAGES_DIR") or str(cache_dir() / "ephemeral")

    @default("workspace_dir")
    def _default_workspaces(self) -> str:
        return os.environ.get("NIXOS_WORKSPACE_VM_IMAGES_DIR") or str(cache_dir() / "workspaces")

    @default("launch_timeout")
    def _default_launch_timeout(self) -> float:
        return float(os.environ.get("SANDBOX_KERNELS_LAUNCH_TIMEOUT") or self.ssh_ready_timeout + 60)

    @validate("memory_mb")
    def _check_memory(self, proposal: dict[str, Any]) -> int:
        if not 128 <= proposal["value"] <= 256 * 1024:
            raise SandboxConfigError(f"memory_mb={proposal['value']} is out of range: use 128 to 262144.")
        return int(proposal["value"])

    @validate("vcpus")
    def _check_vcpus(self, proposal: dict[str, Any]) -> int:
        if not 1 <= proposal["value"] <= 64:
            raise SandboxConfigError(f"vcpus={proposal['value']} is out of range: use 1 to 64.")
        return int(proposal["value"])

    @validate("max_concurrent_vms")
    def _check_max(self, proposal: dict[str, Any]) -> int:
        if proposal["value"] < 1:
            raise SandboxConfigError("max_concurrent_vms (NIXOS_MAX_CONCURRENT_VMS) must be 1 or more.")
        return int(proposal["value"])

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._host: LibvirtHost | None = None
        self._slot: VMSlot | None = None
        self._outbound: OutboundLink | None = None
        self.ssh_port: int | None = None
        self._keys: dict[str, str] = {}
        #: How the VM started: "boot", or "golden" (restored from a golden snapshot).
        self.start_mode = ""
        self._golden_inputs: dict[str, Any] = {}

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
    def _kernel_path(self) -> str:
        return self.guest_kernel or str(Path(self.base_image).with_suffix(".vmlinuz"))

    @property
    def _initrd_path(self) -> str | None:
        if self.guest_initrd:
            return self.guest_initrd
        path = Path(self.base_image).with_suffix(".initrd")
        return str(path) if path.exists() else None

    @property
    def _image_dir(self) -> Path:
        """The VM's own directory: overlay, seed, console log, QEMU's sockets (QEMU may search it)."""
        return Path(self.images_dir) / self.kernel_id

    @property
    def console_path(self) -> Path:
        """The serial console log (written by virtlogd for the guest; read by bounded tails)."""
        return self._image_dir / "console.log"

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
        if self._slot is None:
            self._slot = await acquire_slot(slots_dir(), self.max_concurrent_vms, self.queue_timeout,
                                            self.log, f"kernel {self.kernel_id}")
        return kwargs

    # -- the VM ---------------------------------------------------------------------------------

    async def _libvirt(self) -> LibvirtHost:
        if self._host is None:
            self._host = LibvirtHost(self.libvirt_uri)
            await to_thread(self._host.connect)
        return self._host

    async def create_sandbox(self) -> None:
        """Overlay, keys, seed, domain; then wait for the guest's sshd.

        With a golden snapshot for this configuration the VM is restored from it (and its
        preloader is ready); without one, or if the restore fails, it boots.
        """
        self._preloader_pid = None  # a new machine has none yet
        self.start_mode = "boot"
        spec, base = await self._prepare_vm()
        host = await self._libvirt()
        console = Path(spec.serial_log)
        self.log.info("Kernel %s: VM guest %s; serial console log %s", self.kernel_id,
                      self.sandbox_description(), console)
        found = await to_thread(golden.load, self._golden_key(spec)) if self._golden_eligible() else None
        if found is not None:
            try:
                await self._restore_golden(spec, found)
                self.start_mode = "golden"
                return
            except (SandboxError, OSError) as e:
                self.log.warning("Kernel %s: could not start from golden snapshot %s (%s); booting "
                                 "instead", self.kernel_id, found.key, e)
                await self.close_tunnel()
                await to_thread(host.destroy, self.sandbox_name)
                await self._close_outbound()
                await to_thread((self._image_dir / "root.qcow2").unlink, True)
                root = await to_thread(overlay.create_overlay, base, self._image_dir)
                uid, gids = await to_thread(host.emulator_identity)
                await to_thread(ensure_emulator_access, [str(root)], uid, gids)
                console.write_bytes(b"")
        elif self._golden_eligible():
            self.log.info("Kernel %s: no golden snapshot for this VM configuration; booting "
                          "(`sandbox-kernels vm golden` makes VM starts several times faster)",
                          self.kernel_id)
        await self._start_domain(spec)
        await self._wait_for_ssh(console)

    async def _start_domain(self, spec: DomainSpec, paused: bool = False) -> DomainSpec:
        """Start QEMU for ``spec`` (with its outbound link when allow_network).

        The SSH port was free when chosen, but closed again before QEMU binds it: if another
        process took it meanwhile, QEMU cannot set up the forward, and the VM starts again
        on a new port.

        Returns:
            The spec the VM runs with (its ``ssh_port`` may be new).
        """
        host = await self._libvirt()
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            try:
                await self._with_outbound(lambda: host.start(spec, paused))
                return spec
            except SandboxStartError as e:
                if "host forwarding rule" not in str(e) or attempt == _PORT_ATTEMPTS:
                    raise
                self.log.warning("Kernel %s: SSH port %d was taken before QEMU could bind it; "
                                 "trying another", self.kernel_id, spec.ssh_port)
                spec = dataclasses.replace(spec, ssh_port=_free_port())
                self.ssh_port = spec.ssh_port
        raise AssertionError("unreachable")

    async def _with_outbound(self, start: Callable[[], Any]) -> None:
        """Run ``start`` (which starts QEMU); with allow_network, serve the VM's outbound NIC."""
        if not self.allow_network:
            await to_thread(start)
            return
        if self._outbound is None:
            uid, _gids = await to_thread((await self._libvirt()).emulator_identity)
            self._outbound = OutboundLink(self._image_dir / "outbound.sock", self.kernel_id, uid)
        await to_thread(self._outbound.start_with, start)

    async def _close_outbound(self) -> None:
        if self._outbound is not None:
            await to_thread(self._outbound.close)

    async def _prepare_vm(self) -> tuple[DomainSpec, Path]:
        """Check the images, then make the keys, seed, overlay and console; return the domain."""
        await to_thread(image_policy.check_image, self.base_image, "base_image",
                        image_policy.allowed_dirs(self.image_dirs))
        base = await to_thread(overlay.check_base_image, self.base_image)
        if not os.path.isfile(self._kernel_path):
            raise SandboxConfigError(
                f"guest kernel {self._kernel_path!r} not found: build the image with "
                f"`sandbox-kernels image build vm`, or set guest_kernel.")
        host = await self._libvirt()
        choice = await to_thread(choose_domain_type, self.accelerator, self._kernel_path)
        self.log.debug("Kernel %s: VM domain type %s (%s)", self.kernel_id, choice.domain_type, choice.reason)
        state = self.state_dir
        keys = await to_thread(create_sandbox_keys, state / "ssh", self.kernel_id[:32])
        if self.ssh_key_path:
            client = await to_thread(load_private_key, os.path.expanduser(self.ssh_key_path))
            authorized = f"{client.get_name()} {client.get_base64()}"
            self._keys = {"client": os.path.expanduser(self.ssh_key_path)}
        else:
            authorized = keys.client.public_line
            self._keys = {"client": str(keys.client_key_path)}
        self._keys["host_public"] = keys.host.public_line
        # What QEMU opens lives with the overlay, never in the kernel's private state directory.
        vm_dir = self._image_dir
        root = await to_thread(overlay.create_overlay, base, vm_dir)
        seed = await to_thread(write_seed_disk, vm_dir / "seed.img", keys.host.private_openssh, authorized,
                               f"sandbox-{self.kernel_id[:8]}", self.allow_network, os.urandom(32),
                               bool(self.workspace))
        workspace = None
        if self.workspace:
            from ...settings import parse_size

            workspace = str(await to_thread(overlay.create_workspace, self.workspace_dir,
                                            parse_size(self.workspace_size, "workspace_size"),
                                            f"{self.workspace}.qcow2"))
        console = self.console_path
        console.touch(mode=0o600)
        self.ssh_port = _free_port()
        paths = [str(p) for p in (root, seed, console, self._kernel_path, self._initrd_path, workspace) if p]
        uid, gids = await to_thread(host.emulator_identity)
        await to_thread(ensure_emulator_access, paths, uid, gids)
        spec = DomainSpec(
            kernel_id=self.kernel_id, domain_type=choice.domain_type, memory_mib=self.memory_mb,
            vcpus=self.vcpus, kernel=self._kernel_path, initrd=self._initrd_path, root=str(root),
            seed=str(seed), serial_log=str(console), ssh_port=self.ssh_port,
            allow_network=self.allow_network, workspace=workspace, labels=self.labels,
            reseed_socket=str(vm_dir / "reseed.sock"),
            outbound_socket=str(vm_dir / "outbound.sock") if self.allow_network else None,
            extra_cmdline=boot_cmdline(self.base_image) + tuple(self.extra_cmdline),
        )
        return spec, base

    async def _wait_for_ssh(self, console: Path, connect: Callable[[], Awaitable[Any]] | None = None) -> None:
        """Wait until ``connect`` succeeds (default: open the tunnel) once the guest is up."""
        deadline = time.monotonic() + self.ssh_ready_timeout
        host = await self._libvirt()
        last: Exception | None = None
        while time.monotonic() < deadline:
            text = read_tail(console, 4000)
            if "SANDBOX-FAILED" in text:
                raise SandboxStartError(f"the guest failed to boot. Console:\n{console_tail(console, _CONSOLE_LINES)}")
            state = await to_thread(host.state, self.sandbox_name)
            if state not in ("running", "paused"):
                raise SandboxStartError(f"the VM stopped during boot (state {state}). Console:\n"
                                        f"{console_tail(console, _CONSOLE_LINES)}")
            if "SANDBOX-READY" in text or "sshd" in text:
                try:
                    if connect is None:
                        self.tunnel = await self.open_tunnel()
                    else:
                        await connect()
                    return
                except SandboxError as e:
                    last = e
            await asyncio.sleep(0.3)
        raise SandboxTimeout(
            f"the guest's sshd did not answer within NIXOS_VM_SSH_READY_TIMEOUT="
            f"{self.ssh_ready_timeout:g} s (last error: {last}). Console:\n{console_tail(console, _CONSOLE_LINES)}")

    async def open_tunnel(self) -> SSHTunnel:
        """Connect to the forwarded port with the per-kernel key, pinning the seeded host key."""
        pkey = await to_thread(load_private_key, self._keys["client"])
        tunnel = SSHTunnel("127.0.0.1", int(self.ssh_port or 0), self.ssh_user, pkey,
                           host_key=self._keys["host_public"], connect_timeout=10,
                           reconnect_timeout=self.ssh_ready_timeout, logger=self.log)
        try:
            await to_thread(tunnel.ensure_connected, 10)
        except BaseException:
            await to_thread(tunnel.close)
            raise
        return tunnel

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
                parts.append(f"Serial console:\n{console_tail(console, _CONSOLE_LINES)}")
        return "\n".join(p for p in parts if p)

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
        try:
            host = await self._libvirt()
            await to_thread(host.destroy, self.sandbox_name)
            await to_thread(host.close)
        except SandboxError as e:
            self.log.warning("Kernel %s: could not remove VM %s: %s (`sandbox-kernels reap` will)",
                             self.kernel_id, self.sandbox_name, e)
        self._host = None
        await self._close_outbound()
        kept = [s for s in self._snapshot_meta().values() if s.get("keep")]
        if kept:
            self.log.info("Kernel %s: keeping overlay %s with snapshots %s", self.kernel_id,
                          self._image_dir, [s["name"] for s in kept])
            await to_thread(_remove_all_but_disks, self._image_dir)
        else:
            await to_thread(overlay.remove_images, self._image_dir)
        if self._slot is not None:
            self._slot.release()
            self._slot = None
        self.pid = None

    def runtime_state(self) -> dict[str, Any]:
        """SSH port and key paths in addition to the tunnelled state."""
        return {**super().runtime_state(), "ssh_port": self.ssh_port, "keys": self._keys}

    def load_runtime_state(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`runtime_state`."""
        super().load_runtime_state(state)
        self.ssh_port = state.get("ssh_port")
        self._keys = state.get("keys", {})


#: Console lines shown with a boot error or in diagnostics (a kernel panic's trace is ~40).
_CONSOLE_LINES = 60
#: Starts of one VM on a new SSH port when another process took the chosen one first.
_PORT_ATTEMPTS = 3


def _remove_all_but_disks(directory: Path) -> None:
    """Leave only the qcow2 disks in a kept VM directory (the seed holds the guest's keys)."""
    for entry in directory.iterdir():
        if not entry.name.endswith(".qcow2"):
            entry.unlink(missing_ok=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
