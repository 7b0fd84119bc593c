"""Libvirt runtime: "Python (NixOS VM)", one QEMU virtual machine per kernel (``sandbox-nixos-vm``).

Each kernel gets a copy-on-write overlay of the base image, a seed disk with fresh per-kernel
SSH keys (client key, and the guest host key that is pinned), direct kernel boot, and QEMU
user-mode networking whose only way in is the guest's port 22 forwarded to 127.0.0.1. The
kernel is then started and reached over SSH exactly as on an SSH host. Snapshots are internal
qcow2 snapshots: of the running domain with its memory (libvirt), or of its disks alone.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import socket
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Any

from traitlets import Bool, Float, Int, List, Unicode, default, validate

from ..aio import to_thread
from ..cache import cache_dir
from ..images.vm_image import boot_cmdline
from ..errors import SandboxConfigError, SandboxError, SandboxStartError, SandboxTimeout, SandboxUnavailable
from ..settings import check_name, env_default
from ..snapshots.model import Capabilities, Snapshot
from ..ssh.keys import create_sandbox_keys, load_private_key
from ..ssh.tunnel import SSHTunnel
from ..vm import disk_snapshots, golden, image_policy, overlay
from ..vm.access import ensure_emulator_access
from ..vm.accel import choose_domain_type
from ..vm.domain_xml import DomainSpec
from ..vm.libvirt_conn import LibvirtHost
from ..vm.seed import write_seed_disk
from ..vm.slots import VMSlot, acquire_slot
from ..provisioning.base import _shielded, _track
from .tunnelled import TunnelledProvisioner

#: Wait (in the guest) until the preloader has imported ipykernel; exit 3 with its log if it died.
_WAIT_PRELOADED = r"""
log=$1 pid=$2
while kill -0 "$pid" 2>/dev/null; do
    grep -q '^preloaded' "$log" 2>/dev/null && exit 0
    sleep 0.1
done
tail -n 30 "$log"
exit 3
"""


class LibvirtProvisioner(TunnelledProvisioner):
    """Runs the kernel in its own libvirt/QEMU VM, reached only over SSH."""

    runtime = "libvirt"
    kernel_name = "sandbox-nixos-vm"

    base_image = Unicode(config=True, help="Base qcow2 image. Env: NIXOS_SANDBOX_BASE_IMAGE.")
    guest_kernel = Unicode("", config=True, help="Kernel for direct boot (default: <image>.vmlinuz).")
    guest_initrd = Unicode("", config=True, help="Initrd for direct boot (default: <image>.initrd).")
    images_dir = Unicode(config=True,
                         help="Where per-kernel overlays go. Env: NIXOS_EPHEMERAL_VM_IMAGES_DIR.")
    workspace_dir = Unicode(config=True,
                            help="Persistent workspace disks. Env: NIXOS_WORKSPACE_VM_IMAGES_DIR.")
    workspace = Unicode("", config=True,
                        help="Name of a persistent workspace disk mounted at the working directory.")
    workspace_size = Unicode("4g", config=True, help="Size of a new workspace disk.")
    memory_mb = Int(512, config=True, help="Guest memory in MiB. Env: NIXOS_VM_DEFAULT_MEMORY_MB.")
    _memory_mb_default = env_default("memory_mb", "NIXOS_VM_DEFAULT_MEMORY_MB")
    vcpus = Int(1, config=True, help="Guest CPUs. Env: NIXOS_VM_DEFAULT_VCPUS.")
    _vcpus_default = env_default("vcpus", "NIXOS_VM_DEFAULT_VCPUS")
    max_concurrent_vms = Int(2, config=True,
                             help="VMs at once on this host; more kernels wait. Env: NIXOS_MAX_CONCURRENT_VMS.")
    _max_concurrent_vms_default = env_default("max_concurrent_vms", "NIXOS_MAX_CONCURRENT_VMS")
    queue_timeout = Float(3600.0, config=True, help="Seconds a kernel may wait for a VM slot.")
    ssh_key_path = Unicode("", config=True,
                           help="A static client key instead of a fresh one per VM. Env: NIXOS_VM_SSH_KEY_PATH.")
    _ssh_key_path_default = env_default("ssh_key_path", "NIXOS_VM_SSH_KEY_PATH")
    ssh_user = Unicode("executor", config=True, help="Guest user. Env: NIXOS_VM_SSH_USER.")
    _ssh_user_default = env_default("ssh_user", "NIXOS_VM_SSH_USER")
    ssh_ready_timeout = Float(120.0, config=True,
                              help="Seconds for the guest's sshd to answer. Env: NIXOS_VM_SSH_READY_TIMEOUT.")
    _ssh_ready_timeout_default = env_default("ssh_ready_timeout", "NIXOS_VM_SSH_READY_TIMEOUT")
    job_completion_timeout = Float(300.0, config=True,
                                   help="Seconds a snapshot or rollback may take. Env: NIXOS_JOB_COMPLETION_TIMEOUT.")
    _job_completion_timeout_default = env_default("job_completion_timeout", "NIXOS_JOB_COMPLETION_TIMEOUT")
    enabled = Bool(True, config=True, help="Allow VM kernels on this server. Env: NIXOS_SANDBOX_ENABLED.")
    _enabled_default = env_default("enabled", "NIXOS_SANDBOX_ENABLED")
    accelerator = Unicode("auto", config=True,
                          help="'auto' (probe KVM, fall back to TCG), 'kvm' or 'qemu'. Env: SANDBOX_KERNELS_VM_ACCEL.")
    _accelerator_default = env_default("accelerator", "SANDBOX_KERNELS_VM_ACCEL")
    allow_network = Bool(False, config=True, help="Let the guest open outbound connections.")
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
    libvirt_uri = Unicode("qemu:///system", config=True, help="libvirt connection URI.")
    image_dirs = List(Unicode(), config=True,
                      help="Directories base images, guest kernels and backing files may come from "
                           "(default: the image cache, /var/lib/sandbox-kernels/images and the "
                           "directory of NIXOS_SANDBOX_BASE_IMAGE). Env: SANDBOX_KERNELS_VM_IMAGE_DIRS.")
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
        return Path(self.images_dir) / self.kernel_id

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
            root = Path(self.state_root or "/tmp").parent / "sandbox-kernels-vm-slots"
            self._slot = await acquire_slot(root, self.max_concurrent_vms, self.queue_timeout,
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
                await to_thread(overlay.remove_images, self._image_dir)
                root = await to_thread(overlay.create_overlay, base, self._image_dir)
                uid, gids = await to_thread(host.emulator_identity)
                await to_thread(ensure_emulator_access, [str(root)], uid, gids)
                console.write_bytes(b"")
        elif self._golden_eligible():
            self.log.info("Kernel %s: no golden snapshot for this VM configuration; booting "
                          "(`sandbox-kernels vm golden` makes VM starts several times faster)",
                          self.kernel_id)
        await to_thread(host.start, spec)
        await self._wait_for_ssh(console)

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
        self.log.info("Kernel %s: VM domain type %s (%s)", self.kernel_id, choice.domain_type, choice.reason)
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
        seed = await to_thread(write_seed_disk, state / "seed.img", keys.host.private_openssh, authorized,
                               f"sandbox-{self.kernel_id[:8]}", self.allow_network, os.urandom(32),
                               bool(self.workspace))
        root = await to_thread(overlay.create_overlay, base, self._image_dir)
        workspace = None
        if self.workspace:
            from ..settings import parse_size

            workspace = str(await to_thread(overlay.create_workspace, self.workspace_dir,
                                            parse_size(self.workspace_size, "workspace_size"),
                                            f"{self.workspace}.qcow2"))
        console = state / "console.log"
        console.touch(mode=0o600)
        self.ssh_port = _free_port()
        paths = [str(p) for p in (root, seed, console, self._kernel_path, self._initrd_path, workspace) if p]
        paths.append(str(state))  # QEMU creates the reseed socket there
        uid, gids = await to_thread(host.emulator_identity)
        await to_thread(ensure_emulator_access, paths, uid, gids)
        spec = DomainSpec(
            kernel_id=self.kernel_id, domain_type=choice.domain_type, memory_mib=self.memory_mb,
            vcpus=self.vcpus, kernel=self._kernel_path, initrd=self._initrd_path, root=str(root),
            seed=str(seed), serial_log=str(console), ssh_port=self.ssh_port,
            allow_network=self.allow_network, workspace=workspace, labels=self.labels,
            reseed_socket=str(state / "reseed.sock"),
            extra_cmdline=boot_cmdline(self.base_image) + tuple(self.extra_cmdline),
        )
        return spec, base

    # -- golden snapshots (vm/golden.py) ----------------------------------------------------------

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
        script = resources.files("sandbox_kernels.runtimes").joinpath("kernel_preloader.py").read_bytes()
        inputs = {
            "base": golden.file_identity(self.base_image),
            "kernel": golden.file_identity(spec.kernel),
            "initrd": golden.file_identity(spec.initrd) if spec.initrd else None,
            "domain_type": spec.domain_type, "memory_mib": spec.memory_mib, "vcpus": spec.vcpus,
            "cmdline": spec.cmdline, "network": spec.allow_network, "user": self.ssh_user,
            "python": self.kernel_spec.argv[0], "env": self._golden_env(),
            "preloader": hashlib.sha256(script).hexdigest(), "cwd": self.remote_cwd(),
        }
        self._golden_inputs = inputs
        return golden.golden_key(inputs)

    async def _restore_golden(self, spec: DomainSpec, found: golden.Golden) -> None:
        """Start the VM by reverting a copy of the golden overlay, then reseed it."""
        started = time.monotonic()
        host = await self._libvirt()
        await to_thread(golden.copy_overlay, found, Path(spec.root))
        copied = time.monotonic()
        await to_thread(host.start, spec, True)
        await asyncio.wait_for(to_thread(host.load_snapshot, self.sandbox_name, golden.SNAPSHOT),
                               self.ssh_ready_timeout)
        # Loading left the snapshot's memory image mapped in the overlay as well: without the
        # snapshot itself those clusters are the clone's alone, so its own memory snapshots
        # overwrite them in place instead of copying each one first.
        await to_thread(disk_snapshots.delete, host, self.sandbox_name, golden.SNAPSHOT)
        await to_thread(host.resume, self.sandbox_name)
        restored = time.monotonic()
        await to_thread(golden.reseed, str(spec.reseed_socket), self.ssh_ready_timeout)
        reseeded = time.monotonic()
        await self._wait_for_ssh(Path(spec.serial_log))
        self._preloader_pid = found.preloader_pid
        self.log.info("Kernel %s: VM restored from golden snapshot %s in %.2f s (copy %.2f, "
                      "revert %.2f, reseed %.2f, ssh %.2f)", self.kernel_id, found.key,
                      time.monotonic() - started, copied - started, restored - copied,
                      reseeded - restored, time.monotonic() - reseeded)

    async def build_golden(self) -> golden.Golden:
        """Boot a VM, start the preloader in it, and keep its memory snapshot as the golden one.

        Call on a provisioner configured like the kernelspec it serves, with a kernel id of
        its own (the VM is named and labelled like any other, so a crash leaves nothing that
        `sandbox-kernels reap` cannot remove). A second builder of the same key waits for the
        first and returns its result.

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
        root = Path(self.state_root or "/tmp").parent / "sandbox-kernels-vm-slots"
        self._slot = await acquire_slot(root, self.max_concurrent_vms, self.queue_timeout,
                                        self.log, f"golden snapshot build {self.kernel_id}")
        try:
            spec, _base = await self._prepare_vm()
            key = self._golden_key(spec)
            with golden.build_lock(key):
                existing = await to_thread(golden.load, key)
                if existing is not None:
                    return existing
                return await self._build_golden(spec, key)
        finally:
            await _shielded(self._teardown())

    async def _build_golden(self, spec: DomainSpec, key: str) -> golden.Golden:
        host = await self._libvirt()
        self.log.info("Golden snapshot %s: booting the VM", key)
        await to_thread(host.start, spec)
        await self._wait_for_ssh(Path(spec.serial_log))
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
        await asyncio.sleep(1.0)  # let the guest end the SSH sessions before the snapshot
        self.log.info("Golden snapshot %s: saving the VM's memory", key)
        await asyncio.wait_for(to_thread(host.snapshot_create, self.sandbox_name, golden.SNAPSHOT, True),
                               self.job_completion_timeout)
        snapshot_xml = (await to_thread(host.snapshot_xmls, self.sandbox_name))[0]
        await to_thread(host.destroy, self.sandbox_name)
        saved = await to_thread(golden.save, key, Path(spec.root), snapshot_xml,
                                int(self._preloader_pid or 0), self._golden_inputs)
        self.log.info("Golden snapshot %s saved (%d MiB)", key, saved.root.stat().st_size >> 20)
        return saved

    async def _wait_for_ssh(self, console: Path, connect: Callable[[], Awaitable[Any]] | None = None) -> None:
        """Wait until ``connect`` succeeds (default: open the tunnel) once the guest is up."""
        deadline = time.monotonic() + self.ssh_ready_timeout
        host = await self._libvirt()
        last: Exception | None = None
        while time.monotonic() < deadline:
            text = _tail(console, 4000)
            if "SANDBOX-FAILED" in text:
                raise SandboxStartError(f"the guest failed to boot. Console:\n{_tail(console)}")
            state = await to_thread(host.state, self.sandbox_name)
            if state not in ("running", "paused"):
                raise SandboxStartError(f"the VM stopped during boot (state {state}). Console:\n{_tail(console)}")
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
            f"{self.ssh_ready_timeout:g} s (last error: {last}). Console:\n{_tail(console)}")

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
        if self._state_dir is not None:
            console = self._state_dir / "console.log"
            if console.exists():
                parts.append(f"Serial console:\n{_tail(console)}")
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
        kept = [s for s in self._snapshot_meta().values() if s.get("keep")]
        if kept:
            self.log.info("Kernel %s: keeping overlay %s with snapshots %s", self.kernel_id,
                          self._image_dir, [s["name"] for s in kept])
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

    # -- snapshots ------------------------------------------------------------------------------
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
        console = self.state_dir / "console.log"
        await to_thread(host.start_xml, self.sandbox_name, xml)
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, limit: int = 3000) -> str:
    try:
        data = path.read_bytes()[-limit:]
    except OSError:
        return ""
    return data.decode(errors="replace")
