"""VM warm pools against real libvirtd and QEMU (run under the heavy lock).

Few VM starts on purpose (each is seconds under TCG): one test claims a pooled VM, one shows
that pooled VMs count toward NIXOS_MAX_CONCURRENT_VMS and give their slot to a waiting start.
Each test has its own state root (its own agent), stopped by the fixture.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
from jupyter_client.kernelspec import KernelSpecManager

from helpers.kernels import run_cell, start
from helpers.pool import (agent_log, pool_status, pools_of, private_state_root, remove_state_root, start_phases,
                          wait_pool)

pytestmark = pytest.mark.vm

KERNEL = "sandbox-nixos-vm"
TIMEOUT = 300  # a TCG guest on a loaded two-core machine


def _domains() -> list[str]:
    out = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
                         capture_output=True, text=True, check=True, timeout=30)
    return out.stdout.split()


def _slots_free(limit: int) -> None:
    """Fail early (with the reason) when another VM holds one of the host's slots."""
    from sandbox_kernels.runtimes.vm.slots import slots_dir, try_acquire_slot

    held = [try_acquire_slot(slots_dir(), limit) for _ in range(limit)]
    try:
        assert all(held), "the test needs every VM slot free (is another VM kernel running?)"
    finally:
        for slot in held:
            if slot is not None:
                slot.release()


@pytest.fixture
def vm_pool(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The VM pool on (1 member, 2 VMs at most on the host) with a private agent."""
    _slots_free(2)
    root = private_state_root()
    monkeypatch.setenv("SANDBOX_KERNELS_STATE_DIR", str(root))
    monkeypatch.setenv("NIXOS_VM_POOL_SIZE", "1")
    monkeypatch.setenv("NIXOS_MAX_CONCURRENT_VMS", "2")
    try:
        yield root
    finally:
        remove_state_root(root)
        left = [d for d in _domains() if d.startswith("sandbox-kernels-")]
        assert not left, f"domains left after `pool stop`: {left}"


@pytest.fixture
def phases() -> Iterator[list[dict[str, Any]]]:
    with start_phases() as seen:
        yield seen


def _of(phases: list[dict[str, Any]], kernel_id: str) -> list[str]:
    return [p["phase"] for p in phases if p["kernel_id"] == kernel_id]


async def test_a_vm_start_is_claimed_from_the_pool(vm_pool: Path, phases: list[dict[str, Any]]) -> None:
    cold, kc = await start(KERNEL, timeout=TIMEOUT)  # no agent yet: cold, and it starts one
    try:
        assert cold.provisioner.sandbox_id == cold.kernel_id
    finally:
        kc.stop_channels()
        await cold.shutdown_kernel(now=True)
    pool = await wait_pool(vm_pool, KERNEL, ready=1, timeout=TIMEOUT)
    (member,) = pool["members"]
    assert pool["memory_bytes"] > 0, pool
    assert f"sandbox-kernels-{member}" in _domains()
    km, kc = await start(KERNEL, timeout=TIMEOUT)
    try:
        prov = km.provisioner
        assert prov.sandbox_id == member and prov.sandbox_name == f"sandbox-kernels-{member}"
        mine = _of(phases, km.kernel_id)
        assert mine[0] == "claimed" and mine[-1] == "ready", mine
        assert not {"queued", "restoring", "booting", "reseeding", "creating"} & set(mine), mine
        assert prov.tunnel is not None and prov.tunnel.used_dialed, \
            "the claimed VM's login did not use the connection its pool member dialed ahead"
        out = await run_cell(kc, "import socket; x = 41; print(socket.gethostname(), x + 1)", timeout=TIMEOUT)
        assert out["stdout"] == f"sandbox-{member[:8]} 42\n", out
        await km.restart_kernel(now=True)  # in the claimed VM, with the kernel's own tunnel
        await kc.wait_for_ready(timeout=TIMEOUT)
        out = await run_cell(kc, "import socket; print(socket.gethostname(), 'x' in dir())", timeout=TIMEOUT)
        assert out["stdout"] == f"sandbox-{member[:8]} False\n", out
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)
    assert f"sandbox-kernels-{member}" not in _domains(), "the claimed VM outlived its kernel"


async def test_a_waiting_start_takes_a_pooled_vms_slot(vm_pool: Path, kernelspec_dir: Any,
                                                       phases: list[dict[str, Any]]) -> None:
    """Two slots: one kernel and one pooled VM hold them. A second kernel (of a kernelspec
    that does not claim from the pool) waits in line, the pool gives its VM's slot back, and
    both kernels run."""
    first, kc1 = await start(KERNEL, timeout=TIMEOUT)
    second = kc2 = None
    try:
        (member,) = (await wait_pool(vm_pool, KERNEL, ready=1, timeout=TIMEOUT))["members"]
        no_pool = KernelSpecManager(kernel_dirs=[str(kernelspec_dir(KERNEL, name="vm-no-pool", pool_size=0))])
        second, kc2 = await start("vm-no-pool", ksm=no_pool, timeout=TIMEOUT)
        assert "queued" in _of(phases, second.kernel_id), "the second start never had to wait"
        for kc in (kc1, kc2):
            out = await run_cell(kc, "print(6 * 7)", timeout=TIMEOUT)
            assert out["stdout"] == "42\n", out
        assert f"sandbox-kernels-{member}" not in _domains(), "the pooled VM kept its slot"
        (pool,) = pools_of(pool_status(vm_pool), KERNEL)
        assert pool["ready"] == 0 and pool["members"] == [], pool
        assert "VM slot to a waiting kernel" in agent_log(vm_pool)
        running = [d for d in _domains() if d.startswith("sandbox-kernels-")]
        assert sorted(running) == sorted(f"sandbox-kernels-{k.kernel_id}" for k in (first, second))
    finally:
        for km, kc in ((first, kc1), (second, kc2)):
            if km is not None:
                kc.stop_channels()
                await km.shutdown_kernel(now=True)
