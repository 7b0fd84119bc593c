"""The provisioner base's answers that need no start order: re-attach from provisioner info,
snapshot defaults and coordination, how runtime errors map to poll and signal results, and
the last-resort clean-up at interpreter exit. No engine (see :mod:`helpers.fakes`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from helpers.fakes import FakeRuntime, FakeWorld, fake_kernel_manager, write_fake_kernelspec
from sandbox_kernels.errors import SandboxConnectionError, SandboxError, SandboxUnavailable
from sandbox_kernels.provisioning.exit_cleanup import tracked
from sandbox_kernels.snapshots.model import Snapshot


@contextlib.asynccontextmanager
async def running(world: FakeWorld, tmp_path: Path) -> AsyncIterator[Any]:
    """A fake kernel started by a real KernelManager, shut down (and checked gone) after."""
    km = fake_kernel_manager(write_fake_kernelspec(tmp_path))
    await km.start_kernel()
    try:
        yield km
    finally:
        await km.shutdown_kernel(now=True)
        assert not world.sandboxes


async def test_reattach_from_provisioner_info(world: FakeWorld, tmp_path: Path) -> None:
    """Another process re-attaches from what get_provisioner_info wrote, and can shut it down."""
    async with running(world, tmp_path) as km:
        info = await km.provisioner.get_provisioner_info()
        json.dumps({k: v for k, v in info.items() if k != "connection_info"})  # ours persist as JSON
        assert info["runtime"] == "fake" and info["sandbox_state"] == {"engine_id": f"fake-{km.kernel_id}"}

        other = FakeRuntime(kernel_id=None, kernel_spec=km.kernel_spec,
                            parent=fake_kernel_manager(write_fake_kernelspec(tmp_path)))
        other.world = world
        await other.load_provisioner_info(info)
        assert world.calls[-1] == f"load_runtime_state fake-{km.kernel_id}"
        assert other.kernel_id == km.kernel_id and other.has_process
        assert other.state_dir == Path(info["state_dir"])
        assert await other.poll() is None
        assert other in tracked()
        await other.cleanup()
        assert not world.sandboxes and not other.has_process
        assert not Path(info["state_dir"]).exists()
        assert other not in tracked()


async def test_snapshot_defaults_refuse_with_typed_errors(world: FakeWorld, tmp_path: Path) -> None:
    async with running(world, tmp_path) as km:
        prov = km.provisioner
        caps = prov.snapshot_capabilities()
        assert caps.kinds == [] and "fake" in caps.note
        assert await prov.snapshot_list() == []
        snap = Snapshot(name="s", kind="filesystem", created="2026-01-01T00:00:00", size=0, keep=False)
        for call in (prov.snapshot_create("s", "filesystem", False), prov.snapshot_rollback(snap),
                     prov.snapshot_delete(snap)):
            with pytest.raises(SandboxUnavailable, match="fake runtime"):
                await call


async def test_poll_reports_alive_while_busy_and_signals_wait(world: FakeWorld, tmp_path: Path) -> None:
    async with running(world, tmp_path) as km:
        prov = km.provisioner
        async with prov.busy():
            world.running, world.exit_code = False, 1  # a rollback stops the kernel for a moment
            assert await prov.poll() is None
            signalled = asyncio.ensure_future(prov.send_signal(signal.SIGINT))
            for _ in range(5):
                await asyncio.sleep(0)
            assert not signalled.done(), "a signal waits until the rollback is over"
            world.running = True
        await asyncio.wait_for(signalled, 5)
        assert world.calls[-1] == "signal_kernel SIGINT"
        assert await prov.poll() is None


async def test_runtime_errors_map_to_dead_and_to_undelivered(world: FakeWorld, tmp_path: Path) -> None:
    async with running(world, tmp_path) as km:
        prov = km.provisioner
        world.fail["kernel_exit_code"] = SandboxConnectionError("engine not answering")
        assert await prov.poll() == -1, "a sandbox that cannot be checked is reported dead"
        world.fail = {"signal_kernel SIGINT": SandboxError("no such process"),
                      "signal_kernel SIGTERM": SandboxError("no such process")}
        await prov.send_signal(signal.SIGINT)  # like a local process that already exited
        await prov.terminate()
        world.fail = {"signal_kernel SIGINT": OSError("not ours to hide")}
        with pytest.raises(OSError):
            await prov.send_signal(signal.SIGINT)
        world.fail = {}


async def test_relaunch_kernel_uses_the_last_command_and_env(world: FakeWorld, tmp_path: Path) -> None:
    async with running(world, tmp_path) as km:
        cmd, env = world.last_cmd, world.last_env
        world.last_cmd, world.last_env = [], {}
        await km.provisioner.relaunch_kernel()
        assert (world.last_cmd, world.last_env) == (cmd, env)
        assert world.calls[-2:] == ["start_kernel", "wait_ready"]


_INTERRUPTED_OWNER = textwrap.dedent("""
    import asyncio, atexit, sys
    sys.path.insert(0, sys.argv[1])
    from helpers.fakes import FakeWorld, fake_kernel_manager, use_fake_runtime, write_fake_kernelspec
    from pathlib import Path

    class Patch:
        setattr = staticmethod(setattr)

    world = FakeWorld()
    use_fake_runtime(Patch(), world)
    # Registered before the clean-up handler, so it runs after it (atexit runs last-in first).
    atexit.register(lambda: print("calls", *world.calls, sep="|", flush=True))

    async def main():
        km = fake_kernel_manager(write_fake_kernelspec(Path(sys.argv[2])))
        await km.start_kernel()
        print("started", km.provisioner.sandbox_name, flush=True)
        # The process ends without shutting the kernel down (an uncaught error, Ctrl-C twice).

    asyncio.run(main())
""")


def test_exit_cleanup_removes_what_the_owner_left(world: FakeWorld, tmp_path: Path) -> None:
    state = Path(os.environ["SANDBOX_KERNELS_STATE_DIR"])  # short enough for sockets
    env = {**os.environ,
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")}
    tests = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", _INTERRUPTED_OWNER, tests, str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    started, calls = out.stdout.splitlines()
    assert started.startswith("started sandbox-kernels-")
    assert calls.split("|")[-1] == "destroy_sandbox", out.stdout
    assert not any(state.iterdir()), "the kernel's state directory must be removed at exit"


async def test_shielded_cleanup_finishes_before_the_cancellation_is_raised() -> None:
    from sandbox_kernels.provisioning.exit_cleanup import shielded

    steps: list[str] = []
    release = asyncio.Event()

    async def cleanup() -> None:
        steps.append("begun")
        await release.wait()
        steps.append("done")

    waiter = asyncio.ensure_future(shielded(cleanup()))
    while not steps:
        await asyncio.sleep(0)
    waiter.cancel()  # Ctrl-C while the clean-up runs
    await asyncio.sleep(0)
    assert not waiter.done(), "the cancellation waits for the clean-up"
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert steps == ["begun", "done"]
