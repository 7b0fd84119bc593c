"""RemoteKernel's state machine against a fake Shell and Forwarder (no sandbox, no engine).

In the style of jupyter_client's provisioner tests: the fakes record what the kernel asked
for and answer as a sandbox would, including the fault cases a real one cannot produce on
demand (a kernel that exits during start, a hostile connection file, a preloader gone, a
sandbox gone under a signal, a connection lost for good).
"""

from __future__ import annotations

import json
import signal
from collections.abc import Mapping
from typing import Any

import pytest

from helpers.remote_fakes import LOCAL, PORTS, FakeForwarder, FakeShell, Sockets
from sandbox_kernels.errors import (
    SandboxConnectionError,
    SandboxError,
    SandboxNotFound,
    SandboxStartError,
    SandboxTimeout,
)
from sandbox_kernels.remote import scripts
from sandbox_kernels.remote.kernel import CHANNELS, KernelState, RemoteKernel, parse_ports

def kernel_with(shell: FakeShell, **kwargs: Any) -> tuple[RemoteKernel, FakeForwarder]:
    forwarder = FakeForwarder()
    kwargs.setdefault("launch_timeout", 2.0)
    return RemoteKernel(shell, forwarder, remote_dir="/tmp/k", **kwargs), forwarder


CMD = ["python3", "-m", "ipykernel_launcher", "-f", "/tmp/k/connection.json"]


def reply(ports: Mapping[str, Any]) -> bytes:
    return json.dumps({f"{ch}_port": p for ch, p in ports.items()}).encode()


async def test_start_writes_port_zero_and_forwards_every_channel() -> None:
    shell = FakeShell()
    shell.connection_reply = reply(PORTS)
    kernel, forwarder = kernel_with(shell)
    sockets = Sockets()
    await kernel.start(CMD, {"A": "1"}, {"key": "secret", "shell_port": 50000})
    written = json.loads(shell.files["/tmp/k/connection.json"])
    assert {written[f"{ch}_port"] for ch in CHANNELS} == {0} and written["key"] == "secret"
    assert shell.started[0] == (CMD, "/tmp/k/kernel.log", {"A": "1"})
    assert shell.runs[0] == ["mkdir", "-p", "-m", "700", "/tmp/k"]
    await kernel.wait_ready(LOCAL, sockets)
    assert forwarder.targets == {LOCAL[ch]: PORTS[ch] for ch in CHANNELS}
    assert sorted(sockets.claimed) == sorted(LOCAL.values())
    assert kernel.state.ports == PORTS and await kernel.exit_code() is None


async def test_restart_holds_the_forwards_and_repoints_the_same_listeners() -> None:
    shell = FakeShell()
    shell.connection_reply = reply(PORTS)
    kernel, forwarder = kernel_with(shell)
    sockets = Sockets()
    await kernel.start(CMD, {}, {})
    await kernel.wait_ready(LOCAL, sockets)
    first = kernel.state.pid
    await kernel.stop()
    assert forwarder.paused and shell.signals == [(first, signal.SIGKILL)]
    # While paused (the new kernel is starting), polls do not see the old kernel as the new one.
    new_ports = {ch: p + 100 for ch, p in PORTS.items()}
    shell.connection_reply = reply(new_ports)
    await kernel.start(CMD, {}, {})
    assert kernel.state.pid != first and kernel.state.ports == {}
    assert forwarder.paused  # held until the new kernel's ports are known
    await kernel.wait_ready(LOCAL, sockets)
    assert not forwarder.paused
    assert forwarder.targets == {LOCAL[ch]: new_ports[ch] for ch in CHANNELS}
    assert len(sockets.claimed) == len(CHANNELS)  # the local ends were bound once
    assert forwarder.events.index("pause") < forwarder.events.index(f"repoint {LOCAL['hb']}")


async def test_stop_waits_until_the_kernel_is_gone_when_asked() -> None:
    shell = FakeShell(watches=False)
    shell.connection_reply = reply(PORTS)
    kernel, _ = kernel_with(shell)
    await kernel.start(CMD, {}, {})
    await kernel.stop(wait=1.0)
    assert shell.status(kernel.state.pid or 0, "").state != "running"


async def test_poll_during_a_memory_rollback_adopts_the_snapshots_kernel() -> None:
    shell = FakeShell()
    shell.connection_reply = reply(PORTS)
    kernel, forwarder = kernel_with(shell)
    sockets = Sockets()
    await kernel.start(CMD, {}, {})
    await kernel.wait_ready(LOCAL, sockets)
    later = kernel.state.pid
    saved = KernelState.from_dict(json.loads(json.dumps(
        {"pid": 77, "ports": {ch: p + 7 for ch, p in PORTS.items()}, "preloader_pid": 76})))
    await kernel.pause()  # the rollback holds the clients
    shell.running.add(77)
    await kernel.adopt(saved)
    assert kernel.state.pid == 77 and kernel.state.preloader_pid == 76
    assert [w.pid for w in shell.watches if not w.closed] == [77]
    assert forwarder.targets[LOCAL["shell"]] == PORTS["shell"] + 7 and not forwarder.paused
    assert await kernel.exit_code() is None
    shell.exit(later or 0, 0)  # the later kernel's end is not the adopted one's
    assert await kernel.exit_code() is None
    shell.exit(77, 3)
    assert await kernel.exit_code() == 3


async def test_forget_after_a_reboot() -> None:
    shell = FakeShell()
    shell.connection_reply = reply(PORTS)
    kernel, forwarder = kernel_with(shell)
    await kernel.start(CMD, {}, {})
    await kernel.forget()
    assert kernel.state.pid is None and kernel.state.preloader_pid is None
    assert forwarder.paused and all(w.closed for w in shell.watches)
    assert await kernel.exit_code() == -1


async def test_kernel_exiting_during_start_fails_with_its_code_and_log() -> None:
    shell = FakeShell()
    kernel, forwarder = kernel_with(shell)
    await kernel.start(CMD, {}, {})
    shell.exit(kernel.state.pid or 0, 1)
    shell.connection_reply = None
    with pytest.raises(SandboxStartError, match=r"exit code 1\).*\n.*tail of /tmp/k/kernel.log"):
        await kernel.wait_ready(LOCAL, Sockets())
    assert forwarder.targets == {}


@pytest.mark.parametrize("raw, message", [
    (b"x" * (1 << 16), "larger than"),
    (b"[1, 2]", "JSON object"),
    (json.dumps({f"{ch}_port": 99999 for ch in CHANNELS}).encode(), "not a TCP port"),
    (json.dumps({f"{ch}_port": True for ch in CHANNELS}).encode(), "not a TCP port"),
    (json.dumps({f"{ch}_port": "1234" for ch in CHANNELS}).encode(), "not a TCP port"),
])
async def test_hostile_connection_file_fails_the_start(raw: bytes, message: str) -> None:
    shell = FakeShell()
    shell.connection_reply = raw
    kernel, forwarder = kernel_with(shell)
    await kernel.start(CMD, {}, {})
    with pytest.raises(SandboxStartError, match=message):
        await kernel.wait_ready(LOCAL, Sockets())
    assert forwarder.targets == {}


async def test_connection_file_being_written_is_asked_again_until_the_timeout() -> None:
    shell = FakeShell()
    shell.connection_reply = b'{"shell_port": 1'
    kernel, _ = kernel_with(shell, launch_timeout=0.3)
    await kernel.start(CMD, {}, {})
    with pytest.raises(SandboxTimeout):
        await kernel.wait_ready(LOCAL, Sockets())
    assert sum(r[:3] == ["sh", "-c", scripts.WAIT_PORTS] for r in shell.runs) >= 2


def test_parse_ports() -> None:
    assert parse_ports(reply(PORTS)) == PORTS
    assert parse_ports(b"") is None
    assert parse_ports(reply({**PORTS, "hb": 0})) is None
    assert parse_ports(b"[" * 60000) is None  # deep nesting: no RecursionError escapes


async def test_preloaded_kernel_is_forked_and_a_gone_preloader_is_started_again() -> None:
    shell = FakeShell()
    kernel, _ = kernel_with(shell, preload=True)
    await kernel.start(CMD, {"SECRET": "s"}, {"key": "k"})
    assert [argv[1] for argv, _log, _env in shell.started] == ["/tmp/k/kernel_preloader.py"]
    preloader = kernel.state.preloader_pid
    fork = [r for r in shell.runs if r[:3] == ["sh", "-c", scripts.FORK]]
    assert fork[0][4:] == ["/tmp/k", str(preloader), "/tmp/k/kernel.log"]
    assert not any("SECRET" in w for r in shell.runs for w in r)  # the environment goes on stdin
    # The machine rebooted: the preloader is gone (FORK exits 3); another one is started.
    shell.fork_replies = [3, 0]
    await kernel.start(CMD, {}, {})
    assert len(shell.started) == 2 and kernel.state.preloader_pid != preloader


async def test_preloader_that_keeps_dying_fails_the_start_with_its_log() -> None:
    shell = FakeShell()
    shell.fork_replies = [3, 3]
    kernel, _ = kernel_with(shell, preload=True)
    with pytest.raises(SandboxStartError, match="preloader.*\n.*tail of /tmp/k/preloader.log"):
        await kernel.start(CMD, {}, {})


async def test_fork_that_cannot_write_its_files_fails() -> None:
    shell = FakeShell()
    shell.fork_replies = [4]
    kernel, _ = kernel_with(shell, preload=True)
    with pytest.raises(SandboxStartError, match="could not write"):
        await kernel.start(CMD, {}, {})


async def test_other_commands_are_not_forked() -> None:
    shell = FakeShell()
    kernel, _ = kernel_with(shell, preload=True)
    await kernel.start(["python3", "-c", "pass"], {}, {})
    assert shell.started[0][0] == ["python3", "-c", "pass"] and kernel.state.preloader_pid is None


async def test_signal_of_a_gone_sandbox_is_not_an_error() -> None:
    shell = FakeShell()
    kernel, _ = kernel_with(shell)
    await kernel.start(CMD, {}, {})
    shell.signal_error = SandboxNotFound("pod is gone")
    await kernel.signal(signal.SIGINT)
    await kernel.stop()  # logged, not raised
    shell.signal_error = SandboxError("permission denied")
    with pytest.raises(SandboxError):
        await kernel.signal(signal.SIGINT)


async def test_no_kernel_nothing_to_signal_and_dead() -> None:
    kernel, _ = kernel_with(FakeShell())
    await kernel.signal(signal.SIGINT)
    assert await kernel.exit_code() == -1


async def test_dropped_connection_is_not_a_death_but_a_lost_one_is() -> None:
    shell = FakeShell()
    kernel, _ = kernel_with(shell)
    await kernel.start(CMD, {}, {})
    shell.watches[-1].broken = True
    shell.watch_error = SandboxConnectionError("down")
    assert await kernel.exit_code() is None  # reconnecting
    shell.watch_error = None
    assert await kernel.exit_code() is None and not shell.watches[-1].broken  # watched again
    shell.watches[-1].broken = True
    shell.gave_up = True
    assert await kernel.exit_code() == -1


async def test_shell_without_a_watch_is_asked() -> None:
    shell = FakeShell(watches=False)
    kernel, _ = kernel_with(shell)
    await kernel.start(CMD, {}, {})
    assert await kernel.exit_code() is None
    shell.exit(kernel.state.pid or 0, 9)
    assert await kernel.exit_code() == 9
    shell.exit_codes.clear()
    assert await kernel.exit_code() == -1  # gone without a status


def test_kernel_state_round_trip_drops_wrong_types() -> None:
    state = KernelState(pid=5, ports=dict(PORTS), preloader_pid=4)
    assert KernelState.from_dict(json.loads(json.dumps(state.to_dict()))) == state
    odd = KernelState.from_dict({"pid": "5", "remote_ports": {"shell": True, "x": 1, "hb": 7},
                                 "preloader_pid": 1})
    assert odd == KernelState(pid=None, ports={"hb": 7}, preloader_pid=None)


async def test_close_stops_watching_and_closes_the_forwards() -> None:
    shell = FakeShell()
    kernel, forwarder = kernel_with(shell)
    await kernel.start(CMD, {}, {})
    await kernel.close()
    assert forwarder.closed and all(w.closed for w in shell.watches)
