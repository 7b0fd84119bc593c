"""The provisioner bases that hold a RemoteKernel (remote/provisioner.py, remote/ssh_provisioner.py),
driven with a fake Shell and Forwarder: the order of a restart (forwards held before the kill),
a stopped machine, state for re-attaching."""

from __future__ import annotations

import signal
import uuid
from typing import Any

from jupyter_client.kernelspec import KernelSpec

from helpers.remote_fakes import LOCAL, PORTS, FakeForwarder, FakeShell, Sockets
from sandbox_kernels.remote.kernel import RemoteKernel
from sandbox_kernels.remote.provisioner import RemoteKernelProvisioner
from sandbox_kernels.remote.ssh_provisioner import SSHKernelProvisioner

CMD = ["python3", "-m", "ipykernel_launcher", "-f", "/tmp/k/connection.json"]
SPEC = KernelSpec(argv=CMD, display_name="fake remote", language="python", env={})


class FakeRemote(RemoteKernelProvisioner):
    runtime = "fake-remote"
    kernel_name = "fake-remote"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.shell = FakeShell()
        self.forwarder = FakeForwarder()
        self.alive = True
        self.order: list[str] = []
        real_signal = self.shell.signal
        real_pause = self.forwarder.pause

        def signal_logged(pid: int, signum: int, timeout: float = 30.0) -> bool:
            self.order.append(f"signal {signum}")
            return real_signal(pid, signum, timeout)

        def pause_logged() -> None:
            self.order.append("pause")
            real_pause()

        self.shell.signal = signal_logged  # type: ignore[method-assign]
        self.forwarder.pause = pause_logged  # type: ignore[method-assign]

    async def connect_kernel(self) -> RemoteKernel:
        return RemoteKernel(self.shell, self.forwarder, remote_dir=self.remote_dir(), log=self.log,
                            state=self.kernel_state)

    def remote_dir(self) -> str:
        return "/tmp/k"

    async def sandbox_alive(self) -> bool:
        return self.alive

    async def create_sandbox(self) -> None:
        pass

    async def destroy_sandbox(self) -> None:
        await self.close_kernel()


async def started() -> FakeRemote:
    prov = FakeRemote(kernel_id=str(uuid.uuid4()), kernel_spec=SPEC)
    prov.connection_info = {"key": b"k", **{f"{ch}_port": p for ch, p in LOCAL.items()}}
    await prov.start_kernel(CMD, {})
    assert prov.kernel is not None
    prov.kernel.set_local_ends(LOCAL, Sockets())
    prov.kernel.point_forwards(PORTS)
    return prov


async def test_restart_holds_the_forwards_before_the_kill() -> None:
    prov = await started()
    await prov.kill(restart=True)  # (the base kills only a launched kernel)
    assert prov.order[:1] == ["pause"]
    prov.order.clear()
    await prov.stop_kernel()  # a restart in the same sandbox
    assert prov.order == ["pause", f"signal {int(signal.SIGKILL)}"]


async def test_a_stopped_machine_is_a_dead_kernel_and_takes_no_signal() -> None:
    prov = await started()
    assert await prov.kernel_exit_code() is None
    prov.alive = False
    assert await prov.kernel_exit_code() == -1
    await prov.signal_kernel(signal.SIGINT)
    assert prov.order == []


async def test_state_for_reattaching_round_trips() -> None:
    prov = await started()
    other = FakeRemote(kernel_id=prov.kernel_id, kernel_spec=SPEC)
    other.load_runtime_state(prov.runtime_state())
    assert other.pid == prov.pid and other.kernel_state == prov.kernel_state
    assert await other.kernel_exit_code() == -1  # no kernel held yet: nothing to ask
    await prov.destroy_sandbox()
    assert prov.kernel is None and prov.forwarder.closed


class FakeSSH(SSHKernelProvisioner):
    runtime = "fake-ssh"
    kernel_name = "fake-ssh"

    async def open_tunnel(self) -> Any:
        raise AssertionError("not called")

    def remote_dir(self) -> str:
        return "/tmp/k"

    async def create_sandbox(self) -> None:
        pass

    async def destroy_sandbox(self) -> None:
        pass


async def test_a_new_tunnel_drops_the_held_kernel_but_keeps_its_state() -> None:
    prov = FakeSSH(kernel_id=str(uuid.uuid4()), kernel_spec=SPEC)
    shell = FakeShell()
    prov.kernel = RemoteKernel(shell, FakeForwarder(), remote_dir="/tmp/k", state=prov.kernel_state)
    await prov.kernel.start(CMD, {}, {})
    pid = prov.pid
    prov.tunnel = object()  # type: ignore[assignment]
    assert prov.kernel is None and prov.pid == pid and all(w.closed for w in shell.watches)
