"""The provisioner base's state machine, driven by a real KernelManager over a fake runtime.

No engine: :mod:`helpers.fakes` plays the sandbox. What is checked is the base's contract
with every runtime: the order of hooks on start, restart and shutdown; that everything created
is removed on every failure path (a hook fails, the launch times out, Ctrl-C cancels the
start); that a restart keeps ports and reports the kernel alive meanwhile.
"""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from helpers.fakes import FakeWorld, calls_since, fake_kernel_manager, write_fake_kernelspec
from sandbox_kernels.errors import SandboxConfigError, SandboxStartError, SandboxTimeout
from sandbox_kernels.provisioning.exit_cleanup import tracked
from sandbox_kernels.snapshots.control import ControlServer

START = ["create_sandbox", "start_kernel", "wait_ready"]


def _state_root() -> Path:
    return Path(os.environ["SANDBOX_KERNELS_STATE_DIR"])


def _nothing_left(world: FakeWorld, kernel_id: str) -> None:
    assert not world.sandboxes, "sandbox left behind"
    assert not (_state_root() / kernel_id).exists(), "state directory left behind"
    assert not [p for p in tracked() if p.kernel_id == kernel_id], "still registered for exit clean-up"


async def test_start_and_shutdown_order(world: FakeWorld, tmp_path: Path) -> None:
    km = fake_kernel_manager(write_fake_kernelspec(tmp_path))
    await km.start_kernel()
    try:
        assert world.calls == START
        prov = km.provisioner
        assert prov.sandbox_name in world.sandboxes
        assert await km.is_alive()
        assert prov in tracked()
        assert (_state_root() / km.kernel_id).is_dir()
        # The sandbox's interpreter, not the server's; the connection file as the sandbox sees it.
        assert world.last_cmd[:3] == ["python3", "-m", "ipykernel_launcher"]
        assert world.last_cmd[-1] == prov.sandbox_connection_file()
    finally:
        mark = len(world.calls)
        await km.shutdown_kernel(now=True)
    assert list(calls_since(world, mark)) == ["signal_kernel SIGINT", "signal_kernel SIGKILL", "destroy_sandbox"]
    _nothing_left(world, km.kernel_id)


async def test_start_leaves_the_process_umask_alone(world: FakeWorld, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The state directory and the 0600 control socket are made without touching the umask:
    it is process-wide, and a set-and-restore racing another thread's can leave it changed."""
    def forbidden(mask: int) -> int:
        raise AssertionError(f"os.umask({mask:o}) called")

    monkeypatch.setattr(os, "umask", forbidden)
    km = fake_kernel_manager(write_fake_kernelspec(tmp_path))
    await km.start_kernel()
    try:
        control = _state_root() / km.kernel_id / "control.sock"
        assert stat.S_ISSOCK(control.lstat().st_mode)
        assert control.lstat().st_mode & 0o777 == 0o600
    finally:
        await km.shutdown_kernel(now=True)
    _nothing_left(world, km.kernel_id)


async def test_only_the_kernelspec_env_and_passthrough_reach_the_sandbox(
        world: FakeWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JPY_SESSION_NAME", "notebook.ipynb")
    monkeypatch.setenv("SECRET_OF_THE_HOST", "x")
    km = fake_kernel_manager(write_fake_kernelspec(tmp_path))
    await km.start_kernel()
    try:
        assert world.last_env == {"SPEC_VARIABLE": "from the kernelspec", "JPY_SESSION_NAME": "notebook.ipynb",
                                  "PYTHONUNBUFFERED": "1"}
    finally:
        await km.shutdown_kernel(now=True)


async def test_restart_keeps_sandbox_and_ports(world: FakeWorld, tmp_path: Path) -> None:
    km = fake_kernel_manager(write_fake_kernelspec(tmp_path))
    await km.start_kernel()
    try:
        prov = km.provisioner
        ports = prov.local_ports
        mark = len(world.calls)
        await km.restart_kernel(now=True, newports=True)
        assert km.provisioner is prov
        assert list(calls_since(world, mark)) == [
            "signal_kernel SIGINT", "signal_kernel SIGKILL", "signal_kernel SIGKILL",  # kill, stop_kernel
            "start_kernel", "wait_ready"]
        assert prov.local_ports == ports, "a restart keeps the client's ports"
        assert prov.sandbox_name in world.sandboxes
        assert await km.is_alive()
    finally:
        await km.shutdown_kernel(now=True)
    _nothing_left(world, km.kernel_id)


async def test_restart_with_a_fresh_sandbox(world: FakeWorld, tmp_path: Path) -> None:
    world.keep_sandbox_on_restart = False
    km = fake_kernel_manager(write_fake_kernelspec(tmp_path))
    await km.start_kernel()
    try:
        mark = len(world.calls)
        await km.restart_kernel(now=True)
        assert list(calls_since(world, mark)) == [
            "signal_kernel SIGINT", "signal_kernel SIGKILL", "destroy_sandbox", *START]
        assert await km.is_alive()
    finally:
        await km.shutdown_kernel(now=True)
    _nothing_left(world, km.kernel_id)


async def test_alive_between_restart_cleanup_and_launch(world: FakeWorld, tmp_path: Path) -> None:
    """Clients waiting for a restarted kernel must not conclude it died meanwhile."""
    km = fake_kernel_manager(write_fake_kernelspec(tmp_path))
    await km.start_kernel()
    prov = km.provisioner
    try:
        for keep in (True, False):
            world.keep_sandbox_on_restart = keep
            await prov.cleanup(restart=True)
            assert prov.has_process
            assert await prov.poll() is None
            await prov.launch_kernel(world.last_cmd)
    finally:
        await km.shutdown_kernel(now=True)
    _nothing_left(world, km.kernel_id)


async def test_kernel_death_and_sandbox_loss_poll_dead(world: FakeWorld, tmp_path: Path) -> None:
    km = fake_kernel_manager(write_fake_kernelspec(tmp_path))
    await km.start_kernel()
    prov = km.provisioner
    try:
        world.running, world.exit_code = False, 3
        assert await prov.poll() == 3
        world.running = True
        world.sandboxes.clear()
        assert await prov.poll() == -1
        assert not await km.is_alive()
    finally:
        await km.shutdown_kernel(now=True)
    _nothing_left(world, km.kernel_id)


@pytest.mark.parametrize("hook", START)
async def test_failing_hook_removes_everything(world: FakeWorld, tmp_path: Path, hook: str) -> None:
    world.fail[hook] = SandboxStartError(f"{hook} broke")
    km = fake_kernel_manager(write_fake_kernelspec(tmp_path))
    with pytest.raises(SandboxStartError, match=f"{hook} broke"):
        await km.start_kernel()
    assert world.calls[-1] == "destroy_sandbox"
    assert world.calls[:-1] == START[: START.index(hook) + 1]
    _nothing_left(world, km.kernel_id)


async def test_launch_timeout_removes_everything_and_shows_diagnostics(world: FakeWorld, tmp_path: Path) -> None:
    world.hang.add("wait_ready")
    km = fake_kernel_manager(write_fake_kernelspec(tmp_path, launch_timeout=0.2))
    with pytest.raises(SandboxTimeout) as info:
        await km.start_kernel()
    assert isinstance(info.value, TimeoutError)
    assert "launch_timeout=0.2" in str(info.value) and "fake console tail" in str(info.value)
    assert world.calls == [*START, "destroy_sandbox"]
    _nothing_left(world, km.kernel_id)


@pytest.mark.parametrize("hook", START)
async def test_cancelled_start_removes_everything(world: FakeWorld, tmp_path: Path, hook: str) -> None:
    """Ctrl-C in papermill cancels the start task while a hook runs."""
    world.hang.add(hook)
    km = fake_kernel_manager(write_fake_kernelspec(tmp_path))
    start = asyncio.ensure_future(km.start_kernel())
    await asyncio.wait_for(world.event(hook).wait(), 5)
    start.cancel()
    with pytest.raises(asyncio.CancelledError):
        await start
    assert world.calls[-1] == "destroy_sandbox"
    _nothing_left(world, km.kernel_id)


async def test_failing_destroy_still_removes_state(world: FakeWorld, tmp_path: Path) -> None:
    world.fail["wait_ready"] = SandboxStartError("not ready")
    world.fail["destroy_sandbox"] = SandboxStartError("engine gone")
    km = fake_kernel_manager(write_fake_kernelspec(tmp_path))
    with pytest.raises(SandboxStartError):
        await km.start_kernel()
    assert not (_state_root() / km.kernel_id).exists()
    assert not [p for p in tracked() if p.kernel_id == km.kernel_id]
    world.sandboxes.clear()


async def test_control_socket_failure_removes_everything(world: FakeWorld, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The snapshot control socket is part of the start: if it cannot listen, nothing stays."""
    async def refuse(self: ControlServer) -> None:
        raise OSError("AF_UNIX path too long")

    monkeypatch.setattr(ControlServer, "start", refuse)
    km = fake_kernel_manager(write_fake_kernelspec(tmp_path))
    with pytest.raises(OSError, match="path too long"):
        await km.start_kernel()
    assert world.calls == [*START, "destroy_sandbox"]
    _nothing_left(world, km.kernel_id)


@pytest.mark.parametrize("config, word", [
    ({"launch_timeout": 0}, "launch_timeout"),
    ({"no_such_setting": 1}, "no_such_setting"),
    ({"launch_timeout": "soon"}, "launch_timeout"),
])
async def test_bad_settings_fail_before_anything_is_created(world: FakeWorld, tmp_path: Path,
                                                            config: dict[str, Any], word: str) -> None:
    km = fake_kernel_manager(write_fake_kernelspec(tmp_path, **config))
    with pytest.raises(SandboxConfigError, match=word):
        await km.start_kernel()
    assert world.calls == []
    assert not km.has_kernel


async def test_failed_restart_removes_the_kept_sandbox(world: FakeWorld, tmp_path: Path) -> None:
    """A restart keeps the sandbox; if the new kernel then fails, the sandbox goes too."""
    km = fake_kernel_manager(write_fake_kernelspec(tmp_path))
    await km.start_kernel()
    world.fail["wait_ready"] = SandboxStartError("the new kernel did not come up")
    mark = len(world.calls)
    with pytest.raises(SandboxStartError, match="did not come up"):
        await km.restart_kernel(now=True)
    assert list(calls_since(world, mark))[-3:] == ["start_kernel", "wait_ready", "destroy_sandbox"]
    assert not km.provisioner.has_process and await km.provisioner.poll() == 0
    _nothing_left(world, km.kernel_id)
    await km.shutdown_kernel(now=True)  # what a client does next: nothing to signal, nothing left
    assert world.calls[-1] == "destroy_sandbox" and not any(c.startswith("signal") for c in world.calls[-2:])
