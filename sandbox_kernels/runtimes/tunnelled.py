"""Kernels reached over SSH: the shared part of the VM and SSH-host runtimes.

The kernel runs on the far side of one in-process SSH connection (:class:`SSHTunnel`). It is
started detached (it survives a dropped connection), binds its ZMQ ports on the remote's
127.0.0.1 (ports chosen by the kernel itself, read back from its connection file), and the
provisioner forwards the local ports of the connection info to them. A restart re-points the
forwards at the new kernel's ports; the local ports, and so the clients, never change.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import shlex
import time
from abc import abstractmethod
from importlib import resources
from typing import Any

from ..aio import to_thread
from ..client_sockets import ClientSockets, transport_trait
from ..errors import SandboxConnectionError, SandboxError, SandboxStartError, SandboxTimeout
from ..provisioning.base import SandboxProvisioner
from ..ssh.status import ProcessWatch, parse_int
from ..settings import env_default
from ..ssh.tunnel import SSHTunnel

CHANNELS = ("shell", "iopub", "stdin", "control", "hb")
#: The most bytes read back of a connection file the kernel wrote, and of a log's tail.
_MAX_CONNECTION_FILE = 1 << 16
_LOG_TAIL_BYTES = 1 << 14
#: Wait (in the remote shell) until the kernel has written its real ports; exit 3 if it died.
_WAIT_PORTS = r"""
file=$1 pid=$2 max=$3
while kill -0 "$pid" 2>/dev/null; do
    if grep -q '"hb_port"' "$file" 2>/dev/null && ! grep -q '_port": 0' "$file"; then
        head -c "$max" -- "$file"; exit 0
    fi
    sleep 0.1
done
exit 3
"""


#: One round trip starts a preloaded kernel: the connection file and the fork request (two
#: base64 lines on stdin: the key and the environment never appear in a command line), then
#: the preloader's reply (the child's pid). Exit 3 if the preloader is gone, 4 if the files
#: cannot be written.
_FORK = r"""
dir=$1 pid=$2 log=$3
umask 077
mkdir -p "$dir" && chmod 700 "$dir" || exit 4
read -r connection && read -r request || exit 4
# What the old kernel left here may be links or directories: remove them, create the new
# files exclusively (noclobber), and rename them into place, so nothing planted is followed.
rm -rf "$log" "$log.exit" "$dir/fork-reply" "$dir/fork-request.tmp" "$dir/connection.json" \
    "$dir/connection.json.new" || exit 4
set -C
printf '%s' "$connection" | base64 -d > "$dir/connection.json.new" || exit 4
mv -f "$dir/connection.json.new" "$dir/connection.json" || exit 4
kill -0 "$pid" 2>/dev/null || exit 3
printf '%s' "$request" | base64 -d > "$dir/fork-request.tmp" || exit 4
mv -f "$dir/fork-request.tmp" "$dir/fork-request" || exit 4
while kill -0 "$pid" 2>/dev/null; do
    if [ -s "$dir/fork-reply" ]; then head -c 32 "$dir/fork-reply"; rm -f "$dir/fork-reply"; exit 0; fi
    sleep 0.05
done
rm -f "$dir/fork-request"
exit 3
"""


class TunnelledProvisioner(SandboxProvisioner):
    """Base of runtimes whose kernel is reached through an SSH tunnel."""

    transport = transport_trait()
    _transport_default = env_default("transport", "SANDBOX_KERNELS_TRANSPORT")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tunnel: SSHTunnel | None = None
        self.pid: int | None = None
        self._remote_ports: dict[str, int] = {}
        self._watch: ProcessWatch | None = None
        self._sockets: ClientSockets | None = None
        self._preloader_pid: int | None = None

    # -- hooks for VM / SSH host ----------------------------------------------------------------

    @abstractmethod
    async def open_tunnel(self) -> SSHTunnel:
        """Return a connected tunnel to the sandbox (called once the sandbox exists)."""

    @abstractmethod
    def remote_dir(self) -> str:
        """Absolute directory on the remote for this kernel's connection file and log."""

    async def sandbox_alive(self) -> bool:
        """Whether the machine itself still runs (a VM's domain); hosts say True."""
        return True

    def remote_cwd(self) -> str | None:
        """The kernel's working directory on the remote (None: the login directory)."""
        return None

    def preload_kernels(self) -> bool:
        """Whether kernels are forked from a preloaded process (see kernel_preloader.py).

        Only where the whole machine goes with the kernel (a VM): on a shared host the
        preloader would outlive it. Default False.
        """
        return False

    # -- lifecycle ------------------------------------------------------------------------------

    def configure_transport(self, km: Any) -> None:
        """Unix sockets in the state directory (or TCP on 127.0.0.1, see ``transport``), bound
        now and held for the forwards; a restart keeps them (see :mod:`..client_sockets`)."""
        self._client_sockets().assign(km, self._local_ports)

    def _client_sockets(self) -> ClientSockets:
        if self._sockets is None:
            self._sockets = ClientSockets(self.transport, self.state_dir)
        return self._sockets

    def _release_reserved(self) -> None:
        if self._sockets is not None:
            self._sockets.release()
            self._sockets = None

    def sandbox_connection_file(self) -> str:
        """The connection file lives in the remote kernel directory."""
        return f"{self.remote_dir()}/connection.json"

    @property
    def _log_path(self) -> str:
        return f"{self.remote_dir()}/kernel.log"

    async def _tunnel_ready(self) -> SSHTunnel:
        if self.tunnel is None:
            self.tunnel = await self.open_tunnel()
        return self.tunnel

    async def _remote(self, fn: Any, *args: Any) -> Any:
        """Call a tunnel method; after a dropped connection, reconnect once and retry."""
        tunnel = await self._tunnel_ready()
        try:
            return await to_thread(fn, *args)
        except SandboxConnectionError as e:
            self.log.warning("Kernel %s: SSH connection dropped (%s); reconnecting", self.kernel_id, e)
            await to_thread(tunnel.ensure_connected, 60)
            return await to_thread(fn, *args)

    async def start_kernel(self, cmd: list[str], env: dict[str, str]) -> None:
        """Write a connection file with port 0 (the kernel picks free ports) and start it."""
        tunnel = await self._tunnel_ready()
        info = self.sandbox_connection_info()
        info.update({f"{ch}_port": 0 for ch in CHANNELS}, ip="127.0.0.1", transport="tcp")
        connection = json.dumps(info).encode()
        if self.preload_kernels() and cmd[1:3] == ["-m", "ipykernel_launcher"]:
            self.pid = await self._fork_kernel(tunnel, cmd, env, connection)
        else:
            await self.prepare_remote_dir(tunnel)
            await self._remote(tunnel.write_file, self.sandbox_connection_file(), connection, 0o600)
            self.pid = await self._remote(tunnel.start_detached, cmd, self._log_path, env, self.remote_cwd())
        self._remote_ports = {}
        await self._rewatch()

    async def _fork_kernel(self, tunnel: SSHTunnel, cmd: list[str], env: dict[str, str],
                           connection: bytes) -> int:
        """Have the preloader fork the kernel, starting the preloader first if it is not running.

        The first kernel of a machine waits for the preloader's import; every later one (a
        restart, or any kernel of a VM restored from a golden snapshot) costs one SSH round
        trip and a fork.
        """
        rdir = self.remote_dir()
        request = json.dumps({"argv": ["ipykernel_launcher", *cmd[3:]], "env": env,
                              "cwd": self.remote_cwd() or "", "log": self._log_path}).encode()
        stdin = base64.b64encode(connection) + b"\n" + base64.b64encode(request) + b"\n"
        for _attempt in range(2):
            if self._preloader_pid is None:
                await self.prepare_remote_dir(tunnel)
                await self._start_preloader(tunnel, cmd[0], env)
            result = await self._remote(tunnel.run, [
                "sh", "-c", _FORK, "sandbox-kernels-fork", rdir, str(self._preloader_pid), self._log_path],
                stdin, self.launch_timeout, _LOG_TAIL_BYTES)
            if result.exit_code == 0:
                return parse_int(result.stdout, "the forked kernel's pid")
            if result.exit_code == 4:
                raise SandboxStartError(f"could not write the kernel's files in {rdir}: "
                                        f"{result.stderr.decode(errors='replace').strip()}")
            self._preloader_pid = None  # gone (the machine rebooted, or it failed): start another
        raise SandboxStartError(
            f"the kernel preloader in the sandbox exited before forking the kernel. Its log:\n"
            f"{await self._log_tail(f'{rdir}/preloader.log')}")

    async def prepare_remote_dir(self, tunnel: SSHTunnel) -> None:
        """Make sure the kernel directory exists, private to the login user, before a start.

        Called from :meth:`start_kernel` (and before the preloader starts). The default makes
        it with ``mkdir -p -m 700``: right in a machine of its own (a VM), where no other user
        can reach the parents. Hosts shared with other users override it.
        """
        await self._remote(tunnel.run, ["mkdir", "-p", "-m", "700", self.remote_dir()], None, 30)

    async def _start_preloader(self, tunnel: SSHTunnel, python: str, env: dict[str, str]) -> None:
        """Copy the preloader into the kernel directory and start it with ``python``."""
        rdir = self.remote_dir()
        script = resources.files("sandbox_kernels.guest").joinpath("kernel_preloader.py").read_bytes()
        await self._remote(tunnel.write_file, f"{rdir}/kernel_preloader.py", script, 0o600)
        self._preloader_pid = await self._remote(
            tunnel.start_detached, [python, f"{rdir}/kernel_preloader.py", rdir],
            f"{rdir}/preloader.log", env, self.remote_cwd())

    async def _rewatch(self) -> None:
        """(Re)open the session that reports when the kernel process ends."""
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        if self.tunnel is not None and self.pid is not None:
            self._watch = await to_thread(self.tunnel.watch_process, self.pid, self._log_path, 15)

    async def wait_ready(self) -> None:
        """Wait for the kernel to write its ports, then point the local forwards at them.

        One remote shell waits for the connection file (no SSH round trip per check: under
        TCG each new session costs the guest real time).
        """
        tunnel = await self._tunnel_ready()
        deadline = time.monotonic() + self.launch_timeout
        while time.monotonic() < deadline:
            left = max(1.0, deadline - time.monotonic())
            result = await self._remote(tunnel.run, ["sh", "-c", _WAIT_PORTS, "sandbox-kernels-wait",
                                                     self.sandbox_connection_file(), str(self.pid),
                                                     str(_MAX_CONNECTION_FILE)],
                                        None, left, _MAX_CONNECTION_FILE + _LOG_TAIL_BYTES)
            if result.exit_code == 3:
                status = await self._remote(tunnel.process_status, self.pid, self._log_path)
                raise SandboxStartError(
                    f"the kernel exited during start-up (exit code {status.exit_code}). "
                    f"Kernel log:\n{await self._log_tail()}"
                )
            ports = _ports(result.stdout)
            if ports:
                await to_thread(self._forward, tunnel, ports)
                return
            await asyncio.sleep(0.1)  # the kernel is writing the file right now
        raise SandboxTimeout(f"the kernel did not bind its ports within {self.launch_timeout:g} s")

    def _forward(self, tunnel: SSHTunnel, ports: dict[str, int]) -> None:
        for ch in CHANNELS:
            local = int(self.connection_info[f"{ch}_port"])
            if local in tunnel.forwards:
                tunnel.repoint_forward(local, ports[ch])  # same listener; resumes if paused
            else:
                tunnel.forward(local, ports[ch], sock=self._client_sockets().claim(local))
        self._remote_ports = ports

    def _pause_forwards(self) -> None:
        """The kernel is going away: hold the clients' connections until the next one is up."""
        if self.tunnel is None:
            return
        for local in list(self.tunnel.forwards):
            with contextlib.suppress(SandboxError):
                self.tunnel.pause_forward(local)

    async def kill(self, restart: bool = False) -> None:
        """Kill the kernel; before a restart, hold the forwards first."""
        if restart:
            await to_thread(self._pause_forwards)
        await super().kill(restart)

    async def stop_kernel(self) -> None:
        """Before a restart in the same sandbox: hold the forwards, then kill the kernel."""
        await to_thread(self._pause_forwards)
        await super().stop_kernel()

    async def _log_tail(self, path: str | None = None) -> str:
        """The last ``_LOG_TAIL_BYTES`` of the kernel log (or of ``path``): the kernel writes
        it, so it may be huge, binary, or one endless line."""
        if self.tunnel is None:
            return ""
        path = path or self._log_path
        try:
            result = await to_thread(self.tunnel.run, ["tail", "-c", str(_LOG_TAIL_BYTES), "--", path],
                                     None, 15, _LOG_TAIL_BYTES + 4096)
        except SandboxError as e:
            return f"(log unavailable: {e})"
        return result.stdout.decode(errors="replace")

    async def kernel_exit_code(self) -> int | None:
        """How the kernel process ended, from its watch session; free to call often.

        A dropped SSH connection is not a death: the watch is reopened once the tunnel is back
        (it reconnects by itself); only a tunnel that gave up, or a stopped machine, is.
        """
        if self.tunnel is None or self.pid is None:
            return -1
        if not await self.sandbox_alive():
            return -1
        if self._watch is None or self._watch.broken:
            if self.tunnel.gave_up:
                self.log.error("Kernel %s: SSH connection lost for good: %s", self.kernel_id,
                               self.tunnel.last_error)
                return -1
            try:
                await self._rewatch()
            except (SandboxConnectionError, SandboxTimeout) as e:
                self.log.warning("Kernel %s: SSH connection interrupted (%s); reconnecting", self.kernel_id, e)
                return None
        status = self._watch.status() if self._watch is not None else None
        if status is None:
            return None
        return status.exit_code if status.exit_code is not None else -1

    async def signal_kernel(self, signum: int) -> None:
        """Signal the kernel's process group on the remote."""
        if self.tunnel is not None and self.pid is not None and await self.sandbox_alive():
            await to_thread(self.tunnel.signal, self.pid, signum, 15)

    async def diagnostics(self) -> str:
        """The kernel log's tail."""
        tail = await self._log_tail()
        return f"Kernel log:\n{tail}" if tail.strip() else ""

    async def close_tunnel(self) -> None:
        """Close the SSH connection and every forward (listeners included)."""
        self._release_reserved()
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        if self.tunnel is not None:
            await to_thread(self.tunnel.close)
            self.tunnel = None

    def runtime_state(self) -> dict[str, Any]:
        """The remote pids and ports (for re-attaching)."""
        return {"pid": self.pid, "remote_ports": self._remote_ports, "preloader_pid": self._preloader_pid}

    def load_runtime_state(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`runtime_state`."""
        self.pid = state.get("pid")
        self._remote_ports = state.get("remote_ports", {})
        self._preloader_pid = state.get("preloader_pid")


def _ports(raw: bytes) -> dict[str, int] | None:
    """The five ports from the connection file the kernel rewrote; None while it writes it.

    The sandbox can write that file: anything but five TCP port numbers is refused.

    Raises:
        SandboxStartError: the file is too large, or holds something other than ports.
    """
    if len(raw) >= _MAX_CONNECTION_FILE:
        raise SandboxStartError(f"the kernel's connection file is larger than {_MAX_CONNECTION_FILE} bytes")
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


def quote(argv: list[str]) -> str:
    """Shell-quote an argv for log messages."""
    return " ".join(shlex.quote(a) for a in argv)
