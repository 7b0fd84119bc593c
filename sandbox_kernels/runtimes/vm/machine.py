"""One sandbox VM, assembled in one place: keys, seed disk, overlay, access grants, domain.

:func:`assemble` makes a :class:`Machine` from a :class:`MachineConfig` (what the VM is) and
:class:`MachineKeys` (who may log in, which host key the guest serves). The kernel
provisioner, the golden-snapshot build (``sandbox-kernels vm golden``) and ``sandbox-kernels
image check`` all use it. A machine then has a few explicit operations: :meth:`Machine.boot`,
:meth:`Machine.restore` (from a golden snapshot), :meth:`Machine.wait_ssh`,
:meth:`Machine.snapshot`, :meth:`Machine.rollback`, :meth:`Machine.destroy`.

Every libvirt call blocks; the methods here run them off the event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from ...aio import to_thread
from ...errors import SandboxConfigError, SandboxError, SandboxStartError, SandboxTimeout
from ...ssh.tunnel import SSHTunnel
from . import disk_snapshots, golden, overlay
from .access import ensure_emulator_access
from .accel import AccelChoice, choose_domain_type
from .boot import ConsoleWatch, console_tail, free_port
from .domain_xml import DomainSpec
from .libvirt_conn import LibvirtHost
from .machine_parts import MachineConfig, MachineKeys, describe
from .outbound import OutboundLink
from .seed import refresh_random_seed, write_seed_disk

T = TypeVar("T")

#: Console lines shown with a boot error or in diagnostics (a kernel panic's trace is ~40).
CONSOLE_LINES = 60
#: Starts of one VM on a new SSH port when another process took the chosen one first.
PORT_ATTEMPTS = 3


def assemble(config: MachineConfig, keys: MachineKeys, host: LibvirtHost,
             log: logging.Logger | logging.LoggerAdapter[Any] | None = None) -> Machine:
    """Make the VM's files and its domain description: check the base image and the guest
    kernel, choose the accelerator, create the overlay, the seed disk and the console log,
    choose the SSH port, and let QEMU reach every file. Nothing is started. Blocks.

    Raises:
        SandboxNotFound / SandboxConfigError / SandboxError: a missing or bad image or kernel.
        SandboxUnavailable: no space, qemu-img missing, libvirtd not answering.
    """
    base = overlay.check_base_image(config.base_image)
    if not os.path.isfile(config.kernel):
        raise SandboxConfigError(
            f"guest kernel {config.kernel!r} not found: build the image with "
            f"`sandbox-kernels image build vm`, or set guest_kernel.")
    choice = choose_domain_type(config.accelerator, config.kernel)
    vm_dir = config.vm_dir
    root = overlay.create_overlay(base, vm_dir)
    seed = write_seed_disk(vm_dir / "seed.img", keys.host_private, keys.authorized,
                           config.hostname, config.allow_network, os.urandom(32),
                           config.workspace is not None)
    console = vm_dir / "console.log"
    console.touch(mode=0o600)
    paths = [p for p in (root, seed, console, base, config.kernel, config.initrd, config.workspace) if p]
    uid, gids = host.emulator_identity()
    ensure_emulator_access(paths, uid, gids)
    spec = describe(config, choice.domain_type, free_port())
    return Machine(host, spec, keys, base, choice, log)


class Machine:
    """One VM: its libvirt connection, domain spec, keys and outbound link.

    Made by :func:`assemble` (or, to re-attach, by :meth:`existing`). The domain starts with
    :meth:`boot` or :meth:`restore`; :meth:`destroy` stops it and closes the outbound link;
    :func:`~.machine_parts.remove_files` deletes its directory.
    """

    def __init__(self, host: LibvirtHost, spec: DomainSpec, keys: MachineKeys, base: Path,
                 accel: AccelChoice | None = None,
                 log: logging.Logger | logging.LoggerAdapter[Any] | None = None) -> None:
        self.host = host
        self.spec = spec
        self.keys = keys
        self.base = base
        self.accel = accel
        self.log = log or logging.getLogger("sandbox_kernels.vm")
        self.outbound: OutboundLink | None = None
        #: ``time.monotonic()`` when the domain was last started, and seconds to the guest's
        #: ready marker (set by :meth:`wait_ssh`).
        self.started = 0.0
        self.ready_after = 0.0

    @classmethod
    def existing(cls, config: MachineConfig, keys: MachineKeys, host: LibvirtHost, ssh_port: int,
                 log: logging.Logger | logging.LoggerAdapter[Any] | None = None) -> Machine:
        """The machine of a domain that runs already (a re-attaching server): its files have
        their fixed names in ``config.vm_dir``. (Its domain type is a guess: only a new
        start, which takes libvirt's own XML, would need it.)"""
        domain_type = config.accelerator if config.accelerator in ("kvm", "qemu") else "qemu"
        return cls(host, describe(config, domain_type, ssh_port), keys, Path(config.base_image),
                   None, log)

    @property
    def name(self) -> str:
        """The libvirt domain name."""
        return self.spec.name

    @property
    def ssh_port(self) -> int:
        """The host port on 127.0.0.1 forwarded to the guest's sshd."""
        return self.spec.ssh_port

    @property
    def vm_dir(self) -> Path:
        """The VM's own directory (overlay, seed, console log, sockets)."""
        return Path(self.spec.root).parent

    @property
    def console(self) -> Path:
        """The serial console log."""
        return Path(self.spec.serial_log)

    def console_tail(self, lines: int = CONSOLE_LINES) -> str:
        """The last ``lines`` lines of the serial console."""
        return console_tail(self.console, lines)

    # -- starting ----------------------------------------------------------------------------

    async def boot(self, paused: bool = False) -> None:
        """Start QEMU (with the outbound link when the VM has network).

        The SSH port was free when chosen, but closed again before QEMU binds it: if another
        process took it meanwhile, QEMU cannot set up the forward, and the VM starts again on
        a new port (:attr:`ssh_port` changes).

        Raises:
            SandboxStartError: libvirt or QEMU refused to start it.
        """
        for attempt in range(1, PORT_ATTEMPTS + 1):
            try:
                await self._start(lambda: self.host.start(self.spec, paused))
                return
            except SandboxStartError as e:
                if "host forwarding rule" not in str(e) or attempt == PORT_ATTEMPTS:
                    raise
                self.log.warning("VM %s: SSH port %d was taken before QEMU could bind it; "
                                 "trying another", self.name, self.spec.ssh_port)
                self.spec = dataclasses.replace(self.spec, ssh_port=free_port())

    async def restart(self, xml: str) -> None:
        """Start the domain again from ``xml`` (see :meth:`stop`), same ports and files."""
        await self._start(lambda: self.host.start_xml(self.name, xml))

    async def _start(self, start: Callable[[], Any]) -> None:
        self.started, self.ready_after = time.monotonic(), 0.0
        if not self.spec.allow_network:
            await to_thread(start)
            return
        if self.outbound is None:
            uid, _gids = await to_thread(self.host.emulator_identity)
            self.outbound = OutboundLink(self.vm_dir / "outbound.sock", self.spec.kernel_id, uid)
        await to_thread(self.outbound.start_with, start)

    async def restore(self, found: golden.Golden, timeout: float,
                      on_reseed: Callable[[], None] | None = None) -> dict[str, float]:
        """Start the VM by loading a copy of the golden snapshot, then make it its own
        machine (reseed; ``on_reseed()`` is called as it begins). The caller waits for SSH
        next (:meth:`wait_ssh`).

        Returns:
            Seconds per step: ``copy``, ``revert``, ``reseed``.

        Raises:
            SandboxError / SandboxTimeout / OSError: the restore failed (the domain may run:
                :meth:`reset` before booting instead).
        """
        started = time.monotonic()
        await to_thread(golden.copy_overlay, found, Path(self.spec.root))
        copied = time.monotonic()
        await self.boot(paused=True)
        await asyncio.wait_for(to_thread(self.host.load_snapshot, self.name, golden.SNAPSHOT), timeout)
        # Loading left the snapshot's memory image mapped in the overlay as well: without the
        # snapshot itself those clusters are the clone's alone, so its own memory snapshots
        # overwrite them in place instead of copying each one first.
        await to_thread(disk_snapshots.delete, self.host, self.name, golden.SNAPSHOT)
        await to_thread(self.host.resume, self.name)
        restored = time.monotonic()
        if on_reseed is not None:
            on_reseed()
        await to_thread(golden.reseed, str(self.spec.reseed_socket), timeout)
        return {"copy": copied - started, "revert": restored - copied,
                "reseed": time.monotonic() - restored}

    async def reset(self) -> None:
        """After a failed :meth:`restore`: stop the domain and give it a fresh overlay and an
        empty console, ready for :meth:`boot`."""
        await self.destroy()
        root = Path(self.spec.root)
        await to_thread(root.unlink, True)
        await to_thread(overlay.create_overlay, self.base, self.vm_dir)
        uid, gids = await to_thread(self.host.emulator_identity)
        await to_thread(ensure_emulator_access, [str(root)], uid, gids)
        self.console.write_bytes(b"")

    async def wait_ssh(self, connect: Callable[[], Awaitable[T]], timeout: float,
                       timeout_setting: str = "", booting: bool = True) -> T:
        """Wait for the guest's ready marker on the console, then until ``connect`` succeeds.

        Args:
            connect: opens the login (e.g. :meth:`open_tunnel`); retried while it raises
                :class:`SandboxError`.
            timeout: seconds in all.
            timeout_setting: the setting that sets ``timeout``, named in the error.
            booting: wait for the ready marker first (False: the guest is up already).

        Returns:
            What ``connect`` returned.

        Raises:
            SandboxStartError: the guest reported a failure, or the VM stopped (the console's
                tail is in the message).
            SandboxTimeout: no marker, or no login, within ``timeout``.
        """
        watch = ConsoleWatch(self.console)
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while True:
            seen = await to_thread(watch.poll) or not booting
            if watch.failed is not None:
                raise SandboxStartError(f"the guest of {self.name} failed to boot: {watch.failed}. "
                                        f"Console:\n{self.console_tail()}")
            state = await to_thread(self.host.state, self.name)
            if state not in ("running", "paused"):
                raise SandboxStartError(
                    f"the VM {self.name} stopped during boot (state {state}: a kernel panic, wrong "
                    f"kernel/initrd, or a guest without sandbox-init?). Console:\n{self.console_tail()}")
            if seen:
                if booting and not self.ready_after:
                    self.ready_after = time.monotonic() - self.started
                try:
                    return await connect()
                except SandboxError as e:
                    last = e
            if time.monotonic() > deadline:
                within = f"{timeout_setting}={timeout:g} s" if timeout_setting else f"{timeout:g} s"
                what = (f"the guest's sshd did not answer within {within} (last error: {last})"
                        if seen else f"VM {self.name} did not print SANDBOX-READY within {within}")
                raise SandboxTimeout(f"{what}. Console:\n{self.console_tail()}")
            await asyncio.sleep(0.3)

    async def open_tunnel(self, user: str, reconnect_timeout: float,
                          log: logging.Logger | logging.LoggerAdapter[Any] | None = None,
                          dialed: socket.socket | None = None) -> SSHTunnel:
        """Log in as ``user`` on the forwarded port with the client key, the host key pinned;
        over ``dialed`` (a connection to the port made ahead) first, if given.

        Raises:
            SandboxError: no login (HostKeyMismatch, SandboxConnectionError, SandboxTimeout).
        """
        pkey = await to_thread(self.keys.client_key)
        tunnel = SSHTunnel("127.0.0.1", self.ssh_port, user, pkey, host_key=self.keys.host_public,
                           connect_timeout=10, reconnect_timeout=reconnect_timeout,
                           logger=log or self.log, sock=dialed)  # type: ignore[arg-type]
        try:
            await to_thread(tunnel.ensure_connected, 10)
        except BaseException:
            await to_thread(tunnel.close)
            raise
        return tunnel

    # -- state and snapshots -----------------------------------------------------------------

    async def state(self) -> str:
        """The domain's state (see :meth:`LibvirtHost.state`)."""
        return await to_thread(self.host.state, self.name)

    async def alive(self) -> bool:
        """The domain is running (or paused for a snapshot)."""
        return await self.state() in ("running", "paused")

    async def snapshot(self, name: str, timeout: float, memory: bool = True) -> list[str]:
        """A memory snapshot (libvirt), or with ``memory=False`` a live disk-only one.

        Returns:
            The image files holding a disk-only snapshot (``[]`` for a memory one).
        """
        if memory:
            await asyncio.wait_for(to_thread(self.host.snapshot_create, self.name, name, True), timeout)
            return []
        return await asyncio.wait_for(to_thread(disk_snapshots.create, self.host, self.name, name), timeout)

    async def snapshot_names(self, disk: bool = False) -> set[str]:
        """The memory snapshots libvirt knows; with ``disk`` also the disk-only ones."""
        names = set(await to_thread(self.host.snapshot_list, self.name))
        if disk:
            names |= await to_thread(disk_snapshots.names, self.host, self.name)
        return names

    async def delete_snapshot(self, name: str, memory: bool = True) -> None:
        """Delete a memory snapshot (libvirt) or a disk-only one (the images)."""
        if memory:
            await to_thread(self.host.snapshot_delete, self.name, name)
        else:
            await to_thread(disk_snapshots.delete, self.host, self.name, name)

    async def rollback(self, name: str, timeout: float, reseed_timeout: float | None = None) -> None:
        """Revert the running VM to its memory snapshot ``name``, then give the guest fresh
        random bytes: otherwise two rollbacks to one snapshot would hand out the same random
        numbers (keys, tokens, uuids).

        Raises:
            SandboxError: the revert failed, or the guest could not reseed.
        """
        await asyncio.wait_for(to_thread(self.host.snapshot_revert, self.name, name), timeout)
        await to_thread(refresh_random_seed, self.spec.seed, os.urandom(32))
        await to_thread(golden.reseed, str(self.spec.reseed_socket), reseed_timeout or timeout)

    async def rollback_disks(self, name: str, files: list[str], timeout: float) -> None:
        """Power the VM off, apply the disk-only snapshot ``name`` to ``files`` and start the
        domain again with the same configuration; libvirt's memory-snapshot metadata, which a
        transient domain loses when it stops, is given back. The caller waits for SSH."""
        xml = await to_thread(self.host.restart_xml, self.name)
        memory_snapshots = await to_thread(self.host.snapshot_xmls, self.name)
        await to_thread(self.host.destroy, self.name)
        await to_thread(disk_snapshots.apply, files, name, timeout)
        await self.restart(xml)
        if memory_snapshots:
            await to_thread(self.host.snapshot_redefine, self.name, memory_snapshots)

    # -- the end -----------------------------------------------------------------------------

    async def destroy(self) -> None:
        """Stop and undefine the domain and close its outbound link (idempotent).

        Raises:
            SandboxError: libvirt refused (the outbound link is closed all the same).
        """
        try:
            await to_thread(self.host.destroy, self.name)
        finally:
            if self.outbound is not None:
                await to_thread(self.outbound.close)
