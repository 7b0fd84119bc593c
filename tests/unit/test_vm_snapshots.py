"""The VM runtime's snapshot collaborator against a fake machine host and a fake remote kernel.

:class:`VMSnapshots` sees its provisioner only through public names; :class:`Owner` plays that
provisioner with a real :class:`Machine` (on a fake libvirt host) and a real
:class:`RemoteKernel` (on a fake shell and forwarder).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from sandbox_kernels.remote.kernel import KernelState, RemoteKernel
from sandbox_kernels.runtimes.vm import golden, machine as machine_mod
from sandbox_kernels.runtimes.vm.machine import Machine, assemble
from sandbox_kernels.runtimes.vm.machine_parts import MachineConfig, MachineKeys
from sandbox_kernels.runtimes.vm.snapshots import VMSnapshots
from sandbox_kernels.snapshots.model import Snapshot
from sandbox_kernels.ssh.keys import generate_keypair

from helpers.remote_fakes import LOCAL, PORTS, FakeForwarder, FakeShell, Sockets
from helpers.vm_fakes import FakeHost, fake_images


class Tunnel:
    def __init__(self) -> None:
        self.reconnects = 0

    def reconnect(self, timeout: float) -> None:
        self.reconnects += 1


class Owner:
    """The public face of LibvirtProvisioner that VMSnapshots uses."""

    job_completion_timeout = 5.0
    ssh_ready_timeout = 6.0

    def __init__(self, machine: Machine, state_dir: Path) -> None:
        self.machine = machine
        self.state_dir = state_dir
        self.has_state_dir = True
        self.kernel_state = KernelState(pid=None, ports={}, preloader_pid=None)
        self.shell, self.forwarder = FakeShell(), FakeForwarder()
        self.kernel: RemoteKernel | None = RemoteKernel(
            self.shell, self.forwarder, remote_dir="/tmp/sandbox-kernel", state=self.kernel_state)
        self.channel_ports = dict(LOCAL)
        self.sockets = Sockets()
        self.tunnel = Tunnel()
        self.events: list[str] = []

    def machine_now(self) -> Machine:
        return self.machine

    async def remote_kernel(self) -> RemoteKernel:
        assert self.kernel is not None
        return self.kernel

    def client_sockets(self) -> Any:
        return self.sockets

    async def tunnel_ready(self) -> Tunnel:
        return self.tunnel

    async def wait_for_ssh(self, connect: Any) -> Any:
        self.events.append("wait_for_ssh")
        return await connect()

    async def relaunch_kernel(self) -> None:
        self.events.append(f"relaunch pid={self.kernel_state.pid} paused={self.forwarder.paused}")


@pytest.fixture
def owner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Owner:
    images = fake_images(tmp_path, monkeypatch)
    host_key, client = generate_keypair("host"), generate_keypair("client")
    config = MachineConfig(machine_id="k1", vm_dir=images["vm_dir"], base_image=str(images["base"]),
                           kernel=str(images["kernel"]), initrd=None, hostname="sandbox-k1")
    keys = MachineKeys(host_key.private_openssh, host_key.public_line, client.public_line,
                       client=client.paramiko_key)
    machine = assemble(config, keys, FakeHost())  # type: ignore[arg-type]
    asyncio.run(machine.boot())
    monkeypatch.setattr(golden, "reseed", lambda path, timeout: 0.1)
    state = tmp_path / "state"
    state.mkdir()
    return Owner(machine, state)


async def _started(owner: Owner) -> RemoteKernel:
    kernel = await owner.remote_kernel()
    owner.shell.connection_reply = json.dumps({f"{ch}_port": p for ch, p in PORTS.items()}).encode()
    await kernel.start(["python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"], {},
                       {"key": "k", "transport": "tcp", "ip": "127.0.0.1"})
    await kernel.wait_ready(owner.channel_ports, owner.sockets)
    return kernel


def test_memory_rollback_adopts_the_snapshots_kernel(owner: Owner) -> None:
    async def scenario() -> None:
        kernel = await _started(owner)
        snaps = VMSnapshots(owner)  # type: ignore[arg-type]
        await snaps.create("s1", "memory", keep=True)
        then = KernelState.from_dict(snaps.meta()["s1"])
        assert then.pid == kernel.state.pid and then.ports == PORTS
        # The kernel was restarted since (new pid, new ports); the rollback brings back the old.
        kernel.state.pid, kernel.state.ports = 999, {ch: p + 100 for ch, p in PORTS.items()}
        restarted = await snaps.rollback(Snapshot(name="s1", kind="memory"))
        assert restarted is False
        assert kernel.state.pid == then.pid and owner.tunnel.reconnects == 1
        # The clients' local ports now reach the snapshot's kernel again.
        assert owner.forwarder.targets == {LOCAL[ch]: PORTS[ch] for ch in PORTS}
        assert ("revert", "s1") in owner.machine.host.calls  # type: ignore[attr-defined]
        assert snaps.kept() == ["s1"]
        assert [s.name for s in await snaps.list()] == ["s1"]
        await snaps.delete(Snapshot(name="s1", kind="memory"))
        assert snaps.meta() == {} and await snaps.list() == []

    asyncio.run(scenario())


def test_disk_rollback_forgets_the_kernel_before_the_machine_goes(owner: Owner,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    applied = []
    monkeypatch.setattr(machine_mod.disk_snapshots, "create", lambda host, name, snap: ["/vm/root.qcow2"])
    monkeypatch.setattr(machine_mod.disk_snapshots, "apply",
                        lambda files, name, timeout: applied.append((files, name)))

    async def scenario() -> None:
        await _started(owner)
        snaps = VMSnapshots(owner)  # type: ignore[arg-type]
        await snaps.create("d1", "disk", keep=False)
        assert snaps.meta()["d1"]["files"] == ["/vm/root.qcow2"]
        assert any(argv == ["sync"] for argv in owner.shell.runs)
        restarted = await snaps.rollback(Snapshot(name="d1", kind="disk"))
        assert restarted is True and applied == [(["/vm/root.qcow2"], "d1")]
        # The old kernel is gone with the machine: no pid, its clients held, then a new start.
        assert owner.events == ["wait_for_ssh", "relaunch pid=None paused=True"]
        assert snaps.kept() == []

    asyncio.run(scenario())


def test_no_state_directory_means_no_snapshots(owner: Owner) -> None:
    owner.has_state_dir = False
    assert VMSnapshots(owner).meta() == {}  # type: ignore[arg-type]
