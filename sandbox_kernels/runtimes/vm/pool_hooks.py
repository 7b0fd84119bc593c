"""The VM runtime's part in warm pools (see :mod:`sandbox_kernels.pool`), and the VM slot a
kernel or a pooled VM takes.

A pooled VM holds one of the host's VM slots like any VM, so pools count toward
``NIXOS_MAX_CONCURRENT_VMS``; but a member never waits in the queue: it takes a free slot or
gives up for now (:class:`~sandbox_kernels.pool.warm_pool.SlotBusy`), and a kernel start that
has to wait asks the agent to give a pooled VM's slot back. When a kernel claims the VM, the
slot's lock passes to it as a descriptor, so the slot is never free in between.
"""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...aio import to_thread
from ...pool.client import PoolClient
from ...pool.warm_pool import SlotBusy
from ...ssh.dialed import DialedAhead
from . import golden, slot_queue
from .qemu_process import qemu_pid
from .slots import VMSlot, acquire_slot, slots_dir, try_acquire_slot

if TYPE_CHECKING:
    from .provisioner import LibvirtProvisioner


async def take_slot(prov: LibvirtProvisioner, purpose: str) -> VMSlot:
    """A VM slot for ``prov``'s VM: a pool member's without waiting (:func:`member_slot`); a
    kernel's in line, asking the pool to give a slot back once it has to wait. ``purpose``
    names the waiter in the log."""
    if prov.pool_member:
        return await member_slot(prov)
    limit = prov.max_concurrent_vms
    asked: list[int] = []

    def queued(position: int) -> None:
        if position and not asked:
            asked.append(position)
            ask_pool_for_slot(prov)  # a pooled VM gives its slot back
        prov.start_progress.phase(
            "queued", f"waiting for a VM slot (all {limit} in use), place {position} in line",
            queue_position=position)

    return await acquire_slot(slots_dir(), limit, prov.queue_timeout, prov.log, purpose, queued)


async def member_slot(prov: LibvirtProvisioner) -> VMSlot:
    """A free VM slot for a pool member, without waiting.

    Raises:
        SlotBusy: every slot is taken, or a kernel start waits for one (it goes first).
    """
    directory = slots_dir()
    if not await to_thread(slot_queue.waiters, directory):
        slot = await to_thread(try_acquire_slot, directory, prov.max_concurrent_vms)
        if slot is not None:
            return slot
    raise SlotBusy("no free VM slot for a pooled VM")


def ask_pool_for_slot(prov: LibvirtProvisioner) -> None:
    """A kernel start waits for a VM slot: ask the pool agent (if any) to give one back, in
    the background (called from the queue's ``on_queued``)."""
    if prov.pool_member:
        return

    async def ask() -> None:
        try:
            removed = await to_thread(PoolClient(prov.state_root, timeout=120).yield_slot)
        except Exception as e:  # the pool is an optimisation: never fail the start over it
            prov.log.debug("Kernel %s: asking the pool agent for a VM slot failed: %s", prov.kernel_id, e)
            return
        if removed:
            prov.log.info("Kernel %s: the warm pool gave a VM slot back", prov.kernel_id)

    task = asyncio.ensure_future(ask())
    _asking.add(task)
    task.add_done_callback(_asking.discard)


_asking: set[asyncio.Future[None]] = set()  # running requests (held until done)


def hand_over_fds(slot: VMSlot | None, ahead: DialedAhead | None) -> list[int]:
    """What passes to the claimer: the VM slot's lock, then the connection to the guest's sshd
    dialed ahead, if it is still open (the caller closes them once passed)."""
    if slot is None:
        if ahead is not None:
            ahead.close()
        return []
    fds = [slot.hand_over()]
    sock = ahead.take() if ahead is not None else None
    if sock is not None:
        fds.append(sock.detach())
    return fds


def adopt_fds(fds: list[int]) -> tuple[VMSlot | None, DialedAhead | None]:
    """The claimed VM's slot and the connection dialed ahead, from the descriptors passed
    along by :func:`hand_over_fds` (None for what did not come)."""
    if not fds:
        return None, None
    slot = VMSlot(fds[0], slots_dir() / "(claimed from the warm pool)")
    ahead = None
    if len(fds) > 1:
        try:
            ahead = DialedAhead.received(socket.socket(fileno=fds[1]))
        except OSError:  # not a socket: nothing to log in over
            os.close(fds[1])
    for extra in fds[2:]:
        os.close(extra)
    return slot, ahead


def identity(prov: LibvirtProvisioner) -> dict[str, Any]:
    """The base image's, guest kernel's and initrd's file identity."""
    found = {"base": golden.file_identity(prov.base_image), "kernel": golden.file_identity(prov.kernel_path)}
    if prov.initrd_path:
        found["initrd"] = golden.file_identity(prov.initrd_path)
    return found


def qemu_memory(name: str) -> int:
    """Resident memory of the domain ``name``'s QEMU process, in bytes (0 if not found)."""
    pid = qemu_pid(name)
    if pid is None:
        return 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0
