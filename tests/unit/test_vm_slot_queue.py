"""The VM slot queue: first come, first served across processes, with each waiter's place."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sandbox_kernels.errors import SandboxTimeout
from sandbox_kernels.runtimes.vm import slot_queue
from sandbox_kernels.runtimes.vm.slots import acquire_slot, try_acquire_slot

LOG = logging.getLogger("test-slot-queue")

#: A waiter in another process: joins the line, says so, and stays until its stdin closes.
OTHER_WAITER = """
import sys
from pathlib import Path
from sandbox_kernels.runtimes.vm.slot_queue import QueuePlace
place = QueuePlace(Path(sys.argv[1]))
print(place.name, flush=True)
sys.stdin.read()
place.leave()
"""


@pytest.fixture
def slots(tmp_path: Path) -> Path:
    directory = tmp_path / "slots"
    directory.mkdir(mode=0o700)
    return directory


def test_places_are_in_order_of_arrival_and_move_up(slots: Path) -> None:
    first, second, third = (slot_queue.QueuePlace(slots) for _ in range(3))
    try:
        assert [p.position() for p in (first, second, third)] == [1, 2, 3]
        assert slot_queue.waiters(slots) == [first.name, second.name, third.name]
        second.leave()
        second.leave()  # idempotent
        assert [first.position(), third.position()] == [1, 2]
        first.leave()
        assert third.position() == 1
    finally:
        for place in (first, second, third):
            place.leave()
    assert slot_queue.waiters(slots) == []
    assert os.listdir(slots) == []


def test_a_dead_waiters_file_is_not_counted_and_is_removed(slots: Path) -> None:
    stale = slots / f"{slot_queue.PREFIX}{0:020d}-1-dead.lock"
    stale.write_bytes(b"")  # no one holds its lock: its process died
    place = slot_queue.QueuePlace(slots)
    try:
        assert place.position() == 1
        assert not stale.exists()
    finally:
        place.leave()


def test_waiters_of_other_processes_count_until_they_go(slots: Path) -> None:
    other = subprocess.Popen([sys.executable, "-c", OTHER_WAITER, str(slots)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        name = other.stdout.readline().strip()  # it is in line
        assert name.startswith(slot_queue.PREFIX)
        place = slot_queue.QueuePlace(slots)
        try:
            assert place.position() == 2
            other.kill()  # dies without leaving: its lock goes with it
            other.wait(30)
            assert place.position() == 1
            assert slot_queue.waiters(slots) == [place.name]
        finally:
            place.leave()
    finally:
        if other.poll() is None:
            other.kill()
            other.wait(30)


async def test_acquire_slot_serves_waiters_in_order_and_reports_places(slots: Path) -> None:
    held = try_acquire_slot(slots, 1)
    assert held is not None
    places: dict[str, list[int]] = {"a": [], "b": []}
    changed = asyncio.Event()

    def reporter(who: str):  # noqa: ANN202
        def report(position: int) -> None:
            places[who].append(position)
            changed.set()
        return report

    async def until(condition) -> None:  # noqa: ANN001
        while not condition():
            changed.clear()
            await asyncio.wait_for(changed.wait(), 30)

    a = asyncio.ensure_future(acquire_slot(slots, 1, 60, LOG, "a", reporter("a")))
    await until(lambda: places["a"] == [1])
    b = asyncio.ensure_future(acquire_slot(slots, 1, 60, LOG, "b", reporter("b")))
    await until(lambda: places["b"] == [2])
    try:
        held.release()
        slot_a = await asyncio.wait_for(a, 30)
        await until(lambda: places["b"] == [2, 1])
        assert not b.done()
        slot_a.release()
        (await asyncio.wait_for(b, 30)).release()
    finally:
        held.release()
        for task in (a, b):
            task.cancel()
    assert places == {"a": [1], "b": [2, 1]}
    assert slot_queue.waiters(slots) == []


async def test_a_free_slot_is_taken_without_queueing_and_a_timeout_leaves_the_line(slots: Path) -> None:
    reported: list[int] = []
    first = await acquire_slot(slots, 1, 0, LOG, "first", reported.append)
    try:
        assert reported == []
        with pytest.raises(SandboxTimeout, match="NIXOS_MAX_CONCURRENT_VMS=1"):
            await acquire_slot(slots, 1, 0, LOG, "second", reported.append)
        assert reported == [1]
        assert slot_queue.waiters(slots) == []
    finally:
        first.release()


async def test_a_cancelled_start_leaves_the_line(slots: Path) -> None:
    held = try_acquire_slot(slots, 1)
    assert held is not None
    queued = asyncio.Event()
    task = asyncio.ensure_future(acquire_slot(slots, 1, 60, LOG, "c", lambda _: queued.set()))
    try:
        await asyncio.wait_for(queued.wait(), 30)
        assert len(slot_queue.waiters(slots)) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert slot_queue.waiters(slots) == []
    finally:
        held.release()


async def test_a_waiting_vm_kernel_reports_queued_with_its_place(monkeypatch: pytest.MonkeyPatch,
                                                                 slots: Path) -> None:
    from sandbox_kernels.provisioning import start_progress
    from sandbox_kernels.runtimes.vm.provisioner import LibvirtProvisioner

    monkeypatch.setattr("sandbox_kernels.runtimes.vm.pool_hooks.slots_dir", lambda: slots)
    held = try_acquire_slot(slots, 1)
    assert held is not None
    events: list[dict] = []
    start_progress.add_sink(events.append)
    try:
        prov = LibvirtProvisioner(kernel_id="k-queued", max_concurrent_vms=1, queue_timeout=0)
        with pytest.raises(SandboxTimeout):
            await prov.take_slot("kernel k-queued")
    finally:
        start_progress.remove_sink(events.append)
        held.release()
    assert [(e["phase"], e["queue_position"]) for e in events] == [("queued", 1)]
    assert "waiting for a VM slot" in events[0]["message"] and "place 1" in events[0]["message"]
