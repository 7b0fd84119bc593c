"""One kernel process in a sandbox, driven through a :class:`~.shell.Shell` and a
:class:`~.shell.Forwarder`: the one remote-kernel protocol of the VM, SSH-host and
Kubernetes runtimes.

The kernel is started detached (it outlives a dropped command channel), or forked from a
preloaded process (:mod:`sandbox_kernels.guest.kernel_preloader`) where the whole machine
goes with the kernel. It binds its ZMQ ports on the sandbox's 127.0.0.1 (ports of its own
choosing, read back from its connection file, which the sandbox can write: anything but five
TCP ports is refused), and the forwarder carries the client's local sockets to them. A
restart re-points the forwards at the new kernel's ports; the local ends, and so the clients,
never change.

Every blocking call runs off the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Protocol

from ..aio import to_thread
from ..errors import SandboxConnectionError, SandboxError, SandboxNotFound, SandboxStartError, SandboxTimeout
from ..ssh.status import parse_int
from . import scripts
from .shell import Forwarder, Shell, Watch

CHANNELS = ("shell", "iopub", "stdin", "control", "hb")
#: The most bytes read back of a connection file the kernel wrote, and of a log's tail.
MAX_CONNECTION_FILE = 1 << 16
LOG_TAIL_BYTES = 1 << 14


class SocketSource(Protocol):
    """Where the listening sockets of the local ends come from (a :class:`ClientSockets`)."""

    def claim(self, port: int) -> socket.socket:
        """The listening socket reserved for ``port``, handed over."""


@dataclass
class KernelState:
    """What identifies the running kernel: saved for re-attaching and in memory snapshots.

    Attributes:
        pid: the kernel's wrapper (leader of its process group), None if none runs.
        ports: channel -> the port the kernel bound in the sandbox.
        preloader_pid: the preloaded process kernels are forked from, if one runs.
    """

    pid: int | None = None
    ports: dict[str, int] = field(default_factory=dict)
    preloader_pid: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (``pid``, ``remote_ports``, ``preloader_pid``)."""
        return {"pid": self.pid, "remote_ports": dict(self.ports), "preloader_pid": self.preloader_pid}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KernelState:
        """Inverse of :meth:`to_dict` (``ports`` is read too); values of the wrong type are dropped."""
        ports = data.get("remote_ports", data.get("ports")) or {}
        return cls(pid=_pid(data.get("pid")), preloader_pid=_pid(data.get("preloader_pid")),
                   ports={ch: p for ch, p in dict(ports).items()
                          if ch in CHANNELS and type(p) is int and 0 < p < 65536})


class RemoteKernel:
    """Start, wait for, poll, signal and stop one kernel in a sandbox.

    Args:
        shell: the sandbox's command channel.
        forwarder: carries the client's local sockets to the kernel's ports.
        remote_dir: the kernel's directory in the sandbox (connection file, log); may be set
            later, before :meth:`start`.
        cwd: the kernel's working directory (None: the login directory).
        preload: fork ``python -m ipykernel_launcher`` kernels from a preloaded process (only
            where the whole machine goes with the kernel: elsewhere it would outlive it).
        launch_timeout: seconds for the kernel to start and bind its ports.
        log: where events go.
        prepare_dir: makes ``remote_dir`` before a start (default ``mkdir -p -m 700``: right
            in a machine of its own; shared hosts pass their own).
        state: the kernel's state, shared with the owner (default: a new, empty one).
    """

    def __init__(self, shell: Shell, forwarder: Forwarder, *, remote_dir: str, cwd: str | None = None,
                 preload: bool = False, launch_timeout: float = 60.0, log: logging.Logger | None = None,
                 prepare_dir: Callable[[], Awaitable[None]] | None = None,
                 state: KernelState | None = None) -> None:
        self.shell = shell
        self.forwarder = forwarder
        self.remote_dir = remote_dir
        self.cwd = cwd
        self.preload = preload
        self.launch_timeout = launch_timeout
        self.log = log or logging.getLogger(__name__)
        self.state = state if state is not None else KernelState()
        self._prepare_dir = prepare_dir
        self._watch: Watch | None = None
        self._local_ports: dict[str, int] = {}
        self._sockets: SocketSource | None = None

    @property
    def connection_file(self) -> str:
        """The kernel's connection file in the sandbox."""
        return f"{self.remote_dir}/connection.json"

    @property
    def log_path(self) -> str:
        """The kernel's log in the sandbox (its exit status goes to ``<log_path>.exit``)."""
        return f"{self.remote_dir}/kernel.log"

    # -- starting -------------------------------------------------------------------------------

    async def start(self, cmd: list[str], env: dict[str, str], connection_info: Mapping[str, Any]) -> None:
        """Write the connection file with port 0 (the kernel picks free ports) and start ``cmd``.

        Raises:
            SandboxStartError: the kernel (or its preloader) could not be started.
            SandboxConfigError: a bad command or environment name.
        """
        info = dict(connection_info)
        info.update({f"{ch}_port": 0 for ch in CHANNELS}, ip="127.0.0.1", transport="tcp")
        connection = json.dumps(info).encode()
        if self.preload and cmd[1:3] == ["-m", "ipykernel_launcher"]:
            pid = await self._fork(cmd, env, connection)
        else:
            await self.prepare_dir()
            await to_thread(self.shell.write_file, self.connection_file, connection, 0o600)
            pid = await to_thread(self.shell.start_detached, cmd, self.log_path, env, self.cwd)
        self.state.pid = pid
        self.state.ports = {}
        await self.rewatch()

    async def prepare_dir(self) -> None:
        """Make :attr:`remote_dir`, private to the login user (see ``prepare_dir``)."""
        if self._prepare_dir is not None:
            await self._prepare_dir()
        else:
            await to_thread(self.shell.run, ["mkdir", "-p", "-m", "700", self.remote_dir], None, 30)

    async def _fork(self, cmd: list[str], env: dict[str, str], connection: bytes) -> int:
        """Have the preloader fork the kernel, starting the preloader first if none runs.

        The first kernel of a machine waits for the preloader's import; every later one (a
        restart, or any kernel of a VM restored from a golden snapshot) costs one round trip.
        """
        rdir = self.remote_dir
        request = json.dumps({"argv": ["ipykernel_launcher", *cmd[3:]], "env": env,
                              "cwd": self.cwd or "", "log": self.log_path}).encode()
        stdin = base64.b64encode(connection) + b"\n" + base64.b64encode(request) + b"\n"
        for _attempt in range(2):
            if self.state.preloader_pid is None:
                await self.prepare_dir()
                await self.start_preloader(cmd[0], env)
            result = await to_thread(self.shell.run, [
                "sh", "-c", scripts.FORK, "sandbox-kernels-fork", rdir, str(self.state.preloader_pid),
                self.log_path], stdin, self.launch_timeout, LOG_TAIL_BYTES)
            if result.exit_code == 0:
                return parse_int(result.stdout, "the forked kernel's pid")
            if result.exit_code == 4:
                raise SandboxStartError(f"could not write the kernel's files in {rdir}: "
                                        f"{result.stderr.decode(errors='replace').strip()}")
            self.state.preloader_pid = None  # gone (the machine rebooted, or it failed): start another
        raise SandboxStartError(
            f"the kernel preloader in the sandbox exited before forking the kernel. Its log:\n"
            f"{await self.log_tail(f'{rdir}/preloader.log')}")

    async def start_preloader(self, python: str, env: dict[str, str]) -> int:
        """Copy the preloader into :attr:`remote_dir` (which must exist) and start it.

        Returns:
            Its pid (also in ``state.preloader_pid``); its log is ``<remote_dir>/preloader.log``.
        """
        rdir = self.remote_dir
        script = await to_thread(resources.files("sandbox_kernels.guest").joinpath("kernel_preloader.py").read_bytes)
        await to_thread(self.shell.write_file, f"{rdir}/kernel_preloader.py", script, 0o600)
        self.state.preloader_pid = await to_thread(
            self.shell.start_detached, [python, f"{rdir}/kernel_preloader.py", rdir],
            f"{rdir}/preloader.log", env, self.cwd)
        return self.state.preloader_pid

    async def wait_ready(self, local_ports: Mapping[str, int], sockets: SocketSource) -> None:
        """Wait for the kernel to write its ports, then point the local ends at them.

        One remote shell waits for the connection file (no round trip per check: under TCG
        each new session costs the guest real time).

        Args:
            local_ports: channel -> the client's local port (the connection info's).
            sockets: hands over the listening socket of a local port not forwarded yet.

        Raises:
            SandboxStartError: the kernel exited first (its log is in the message), or its
                connection file holds something other than five ports.
            SandboxTimeout: no ports within ``launch_timeout``.
        """
        pid = self.state.pid
        if pid is None:
            raise SandboxStartError("no kernel was started")
        self.set_local_ends(local_ports, sockets)
        deadline = time.monotonic() + self.launch_timeout
        while time.monotonic() < deadline:
            left = max(1.0, deadline - time.monotonic())
            result = await to_thread(self.shell.run, [
                "sh", "-c", scripts.WAIT_PORTS, "sandbox-kernels-wait", self.connection_file, str(pid),
                str(MAX_CONNECTION_FILE)], None, left, MAX_CONNECTION_FILE + LOG_TAIL_BYTES)
            if result.exit_code == 3:
                status = await to_thread(self.shell.status, pid, self.log_path)
                raise SandboxStartError(
                    f"the kernel exited during start-up (exit code {status.exit_code}). "
                    f"Kernel log:\n{await self.log_tail()}")
            ports = parse_ports(result.stdout)
            if ports:
                await to_thread(self.point_forwards, ports)
                return
            await asyncio.sleep(0.1)  # the kernel is writing the file right now
        raise SandboxTimeout(f"the kernel did not bind its ports within {self.launch_timeout:g} s")

    def set_local_ends(self, local_ports: Mapping[str, int], sockets: SocketSource) -> None:
        """Name the client's local ends: channel -> local port, and where their listening
        sockets come from (for forwards not open yet)."""
        self._local_ports, self._sockets = dict(local_ports), sockets

    def point_forwards(self, ports: Mapping[str, int]) -> None:
        """Carry the local ends (as given to :meth:`wait_ready` or :meth:`adopt`) to ``ports``.

        Blocks (call it with ``to_thread``).
        """
        forwards = self.forwarder.forwards
        for ch in CHANNELS:
            local = int(self._local_ports[ch])
            if local in forwards:
                self.forwarder.repoint(local, ports[ch])  # same listener; resumes if paused
            else:
                assert self._sockets is not None, "wait_ready or adopt names the local ends first"
                self.forwarder.forward(local, ports[ch], self._sockets.claim(local))
        self.state.ports = dict(ports)

    # -- running --------------------------------------------------------------------------------

    async def rewatch(self) -> None:
        """(Re)open the watch that reports when the kernel ends (shells without one: none)."""
        self.close_watch()
        if self.state.pid is not None:
            self._watch = await to_thread(self.shell.watch, self.state.pid, self.log_path, 15)

    def close_watch(self) -> None:
        """Stop watching the kernel (it is going away, or the channel is)."""
        if self._watch is not None:
            self._watch.close()
            self._watch = None

    async def exit_code(self) -> int | None:
        """None while the kernel runs, else its exit code (-1: gone without one); cheap to
        call often where the shell has a watch.

        A dropped channel is not a death: the watch is reopened once it is back; only a
        shell that gave up is.
        """
        pid = self.state.pid
        if pid is None:
            return -1
        if self._watch is None or self._watch.broken:
            if self.shell.gave_up:
                self.log.error("Connection to the sandbox lost for good: %s",
                               getattr(self.shell, "last_error", None))
                return -1
            try:
                await self.rewatch()
            except (SandboxConnectionError, SandboxTimeout) as e:
                self.log.warning("Connection to the sandbox interrupted (%s); reconnecting", e)
                return None
        if self._watch is not None:
            status = self._watch.status()
        else:
            try:
                status = await to_thread(self.shell.status, pid, self.log_path, 15)
            except (SandboxConnectionError, SandboxTimeout) as e:
                self.log.warning("Asking the sandbox about the kernel failed (%s)", e)
                return None
        if status is None or status.state == "running":
            return None
        return status.exit_code if status.exit_code is not None else -1

    async def signal(self, signum: int) -> None:
        """Signal the kernel's process group; a gone sandbox has nothing to signal.

        Raises:
            SandboxError: the signal could not be sent for another reason.
        """
        if self.state.pid is None:
            return
        try:
            await to_thread(self.shell.signal, self.state.pid, signum, 15)
        except SandboxNotFound as e:
            self.log.debug("The sandbox is gone; no signal sent (%s)", e)

    async def pause(self) -> None:
        """The kernel is going away: hold the clients' connections until the next one is up."""
        await to_thread(self.forwarder.pause)

    async def stop(self, wait: float = 0.0) -> None:
        """Before a restart in the same sandbox: hold the forwards, then kill the kernel (and
        wait up to ``wait`` seconds until it is gone). Failures are logged, not raised."""
        await self.pause()
        pid = self.state.pid
        if pid is None:
            return
        try:
            await self.signal(signal.SIGKILL)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if (await to_thread(self.shell.status, pid, self.log_path)).state != "running":
                    break
                await asyncio.sleep(0.1)
        except SandboxError as e:
            self.log.warning("Could not stop the kernel process %d: %s", pid, e)

    async def forget(self) -> None:
        """The machine goes away under the kernel (a reboot): no pid, no preloader, no
        watch; the forwards are held for the next kernel."""
        self.close_watch()
        self.state.pid = self.state.preloader_pid = None
        await self.pause()

    async def adopt(self, state: KernelState, local_ports: Mapping[str, int] | None = None,
                    sockets: SocketSource | None = None) -> None:
        """Take over the kernel of ``state`` (after a memory rollback: the snapshot's pid,
        preloader and ports), watch it and point the forwards at its ports.

        ``local_ports`` and ``sockets`` default to those :meth:`wait_ready` was given.
        """
        if local_ports is not None and sockets is not None:
            self.set_local_ends(local_ports, sockets)
        self.state.pid, self.state.preloader_pid = state.pid, state.preloader_pid
        await self.rewatch()
        if state.ports and state.ports != self.state.ports:
            await to_thread(self.point_forwards, dict(state.ports))

    async def log_tail(self, path: str | None = None) -> str:
        """The last ``LOG_TAIL_BYTES`` of the kernel log (or of ``path``): the kernel writes
        it, so it may be huge, binary, or one endless line."""
        return await to_thread(self.shell.tail, path or self.log_path, LOG_TAIL_BYTES)

    async def close(self) -> None:
        """Stop watching and close the forwards (listeners included)."""
        self.close_watch()
        with contextlib.suppress(SandboxError):
            await to_thread(self.forwarder.close)


def parse_ports(raw: bytes) -> dict[str, int] | None:
    """The five ports from the connection file the kernel rewrote; None while it writes it.

    The sandbox can write that file: anything but five TCP port numbers is refused.

    Raises:
        SandboxStartError: the file is too large, or holds something other than ports.
    """
    if len(raw) >= MAX_CONNECTION_FILE:
        raise SandboxStartError(f"the kernel's connection file is larger than {MAX_CONNECTION_FILE} bytes")
    try:
        info = json.loads(raw or b"{}")
    except (ValueError, RecursionError):
        return None  # being rewritten by the kernel right now
    if not isinstance(info, dict):
        raise SandboxStartError("the kernel's connection file does not hold a JSON object")
    ports = {}
    for ch in CHANNELS:
        value = info.get(f"{ch}_port")
        if value in (None, 0):
            return None
        if type(value) is not int or not 1 <= value <= 65535:
            raise SandboxStartError(
                f"the kernel's connection file holds {ch}_port={str(value)[:40]!r}, not a TCP port")
        ports[ch] = value
    return ports


def _pid(value: Any) -> int | None:
    return value if type(value) is int and value > 1 else None
