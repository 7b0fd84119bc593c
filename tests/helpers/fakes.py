"""A fake runtime: a :class:`SandboxProvisioner` whose sandbox and kernel live in memory.

Like jupyter_client's own provisioner tests, it lets a real ``KernelManager`` drive the base's
state machine (launch, poll, signals, restart, clean-up, re-attach) with no engine. A
:class:`FakeWorld` plays the engine: it records every hook call in order and can make any
hook fail or hang, so each failure path is reproducible on demand.
"""

from __future__ import annotations

import asyncio
import json
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from jupyter_client.provisioning.factory import KernelProvisionerFactory

from sandbox_kernels.provisioning.base import SandboxProvisioner

FAKE_KERNEL = "fake-sandbox"


@dataclass
class FakeWorld:
    """What the fake engine holds, and the faults it is told to produce."""

    calls: list[str] = field(default_factory=list)
    sandboxes: set[str] = field(default_factory=set)
    running: bool = False
    exit_code: int | None = None
    last_cmd: list[str] = field(default_factory=list)
    last_env: dict[str, str] = field(default_factory=dict)
    #: hook name -> exception it raises ("create_sandbox", "start_kernel", "wait_ready", ...)
    fail: dict[str, BaseException] = field(default_factory=dict)
    #: hook names that block until cancelled
    hang: set[str] = field(default_factory=set)
    #: set when a hook is entered, by hook name (to act mid-start, never after a sleep)
    entered: dict[str, asyncio.Event] = field(default_factory=dict)
    keep_sandbox_on_restart: bool = True
    #: what each provisioner instance was (the last one is the kernel manager's)
    provisioners: list["FakeRuntime"] = field(default_factory=list)

    def event(self, hook: str) -> asyncio.Event:
        return self.entered.setdefault(hook, asyncio.Event())

    async def hook(self, name: str) -> None:
        self.calls.append(name)
        self.event(name).set()
        if name in self.fail:
            raise self.fail[name]
        if name in self.hang:
            await asyncio.Event().wait()


class FakeRuntime(SandboxProvisioner):
    """The base's hooks over a :class:`FakeWorld` (set as ``world`` before use)."""

    runtime = "fake"
    kernel_name = FAKE_KERNEL
    world: FakeWorld

    async def create_sandbox(self) -> None:
        await self.world.hook("create_sandbox")
        self.world.sandboxes.add(self.sandbox_name)

    async def start_kernel(self, cmd: list[str], env: dict[str, str]) -> None:
        await self.world.hook("start_kernel")
        self.world.last_cmd, self.world.last_env = cmd, env
        self.world.running, self.world.exit_code = True, None

    async def wait_ready(self) -> None:
        await self.world.hook("wait_ready")

    async def kernel_exit_code(self) -> int | None:
        await self.world.hook("kernel_exit_code")
        if self.sandbox_name not in self.world.sandboxes:
            return -1
        return None if self.world.running else self.world.exit_code

    async def signal_kernel(self, signum: int) -> None:
        await self.world.hook(f"signal_kernel {signal.Signals(signum).name}")
        if signum in (signal.SIGKILL, signal.SIGTERM) and self.world.running:
            self.world.running, self.world.exit_code = False, -signum

    async def destroy_sandbox(self) -> None:
        await self.world.hook("destroy_sandbox")
        self.world.sandboxes.discard(self.sandbox_name)
        self.world.running = False

    async def keep_sandbox_on_restart(self) -> bool:
        return self.world.keep_sandbox_on_restart

    async def diagnostics(self) -> str:
        return "fake console tail"

    def runtime_state(self) -> dict[str, Any]:
        return {"engine_id": f"fake-{self.kernel_id}"}

    def load_runtime_state(self, state: dict[str, Any]) -> None:
        self.world.calls.append(f"load_runtime_state {state['engine_id']}")


def write_fake_kernelspec(root: Path, **config: Any) -> KernelSpecManager:
    """A kernelspec directory with the fake kernel (provisioner ``config`` as given)."""
    spec = {
        "argv": ["python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Fake sandbox",
        "language": "python",
        "env": {"SPEC_VARIABLE": "from the kernelspec"},
        "metadata": {"kernel_provisioner": {"provisioner_name": "fake-provisioner", "config": config}},
    }
    target = root / "kernels" / FAKE_KERNEL
    target.mkdir(parents=True, exist_ok=True)
    (target / "kernel.json").write_text(json.dumps(spec))
    return KernelSpecManager(kernel_dirs=[str(root / "kernels")])


def use_fake_runtime(monkeypatch: Any, world: FakeWorld) -> None:
    """Make jupyter_client's provisioner factory build :class:`FakeRuntime` over ``world``."""

    def create(self: Any, kernel_id: str, kernel_spec: Any, parent: Any) -> FakeRuntime:
        config = kernel_spec.metadata.get("kernel_provisioner", {}).get("config", {})
        provisioner = FakeRuntime(kernel_id=kernel_id, kernel_spec=kernel_spec, parent=parent, **config)
        provisioner.world = world
        world.provisioners.append(provisioner)
        return provisioner

    available = KernelProvisionerFactory.is_provisioner_available

    def is_available(self: Any, kernel_spec: Any) -> bool:
        name = kernel_spec.metadata.get("kernel_provisioner", {}).get("provisioner_name")
        return name == "fake-provisioner" or available(self, kernel_spec)

    monkeypatch.setattr(KernelProvisionerFactory, "create_provisioner_instance", create)
    monkeypatch.setattr(KernelProvisionerFactory, "is_provisioner_available", is_available)


def fake_kernel_manager(ksm: KernelSpecManager) -> AsyncKernelManager:
    return AsyncKernelManager(kernel_name=FAKE_KERNEL, kernel_spec_manager=ksm)


def calls_since(world: FakeWorld, mark: int) -> Iterator[str]:
    """The hook calls after index ``mark``, without the restarter's polls."""
    return (c for c in world.calls[mark:] if c != "kernel_exit_code")
