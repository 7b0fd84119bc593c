"""The hostile suite every runtime passes: code inside a real kernel attacks the host.

Like ``tests/lifecycle.py`` for the well-behaved kernel, this is one suite that each runtime's
module subclasses, supplying a :class:`HostileRuntime` through the ``hostile`` fixture. Each
test runs attack code in the kernel, drives the host through what a user would do next
(restart, rollback, shutdown), and asserts the property that must hold. Attacks only aim at
listeners the test opens on 127.0.0.1 (or at addresses inside the sandbox that a backend maps
to the host's loopback); never at any other address.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from jupyter_client.ioloop.restarter import AsyncIOLoopKernelRestarter
from jupyter_client.kernelspec import KernelSpecManager

from lifecycle import run_cell, start, wait_until

MiB = 1 << 20
#: What the host may keep on disk of one kernel's raw output (a log file and its rotation).
HOST_OUTPUT_CAP = 64 * MiB


@dataclass
class HostileRuntime:
    """What the suite needs to know about one runtime."""

    kernel_name: str
    #: Does a sandbox for this kernel id exist right now?
    sandbox_exists: Callable[[str], bool]
    start_timeout: float = 120.0
    exec_timeout: float = 60.0
    #: Extra provisioner config for the kernelspec the suite starts.
    config: dict[str, Any] = field(default_factory=dict)
    #: Addresses inside the sandbox that a network backend could map to the host's loopback.
    loopback_aliases: list[str] = field(default_factory=list)
    #: Whether the sandbox bounds the kernel's processes (a container's pids limit, a node's
    #: podPidsLimit) and memory (a cgroup limit, a VM's fixed memory). Where it does not (an SSH
    #: host has only the remote account's limits; a VM bounds processes only by its memory), the
    #: attacks stay bounded by their own counts and only the kernel's recovery is asserted.
    process_limit: bool = True
    memory_limit: bool = True
    #: Whether the sandbox bounds the disk the kernel can fill (a VM's disk, a pod's
    #: ephemeral-storage limit); elsewhere the fill stays bounded by its own size.
    disk_limit: bool = False
    #: Bytes the output flood writes to the kernel's own stdout/stderr file descriptors.
    flood_bytes: int = 512 * MiB
    #: Owner the canary file gets (the account a host-side write could act as).
    canary_owner: tuple[int, int] = (0, 0)
    #: Bytes of the kernel's output the host keeps on its own disk (a container's log file, a
    #: VM's console log), for runtimes that keep any; bounded after the flood.
    host_output_bytes: Callable[[str], int] | None = None


@dataclass(frozen=True)
class FileState:
    """What must not change about a host file: content, owner, mode, link count."""

    digest: str
    uid: int
    gid: int
    mode: int
    nlink: int

    @classmethod
    def of(cls, path: Path) -> "FileState":
        st = path.lstat()
        return cls(hashlib.sha256(path.read_bytes()).hexdigest(), st.st_uid, st.st_gid,
                   st.st_mode, st.st_nlink)


class LoopbackListener:
    """A TCP listener on the host's 127.0.0.1 that counts the connections it accepts."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


#: Runs in the kernel: swap every entry of the directories it shares with the host (its
#: connection file's directory, its ipc socket directory, bind mounts) for symlinks to the
#: canary, try hard links, plant FIFOs, a 1 TiB sparse file, and links under the names a host
#: might write next. Prints the directories it attacked.
LINK_SWAP = r'''
import json, os, sys
canary = {canary!r}
names = ["connection.json", "kernel.log", "kernel.log.exit", "control.sock", "preloader.log",
         "fork-request", "fork-reply", "env", "connection.json.tmp"]
cf = sys.argv[sys.argv.index("-f") + 1]
dirs = {{os.path.dirname(os.path.abspath(cf))}}
info = json.load(open(cf))
if info.get("transport") == "ipc":
    dirs.add(os.path.dirname(info["ip"]))
for line in open("/proc/self/mountinfo"):
    root, point = line.split()[3:5]
    if root != "/" and os.path.isdir(point) and os.access(point, os.W_OK):
        dirs.add(point)
for d in sorted(dirs):
    if not os.access(d, os.W_OK):
        continue
    for name in set(os.listdir(d)) | set(names):
        path = os.path.join(d, name)
        for make in (lambda p: os.link(canary, p), lambda p: os.symlink(canary, p)):
            tmp = path + ".swap"
            try:
                make(tmp)
                os.replace(tmp, path)
                break
            except OSError:
                try: os.unlink(tmp)
                except OSError: pass
    try:
        os.mkfifo(os.path.join(d, "fifo"))
    except OSError:
        pass
    try:
        with open(os.path.join(d, "huge"), "wb") as f:
            f.truncate(1 << 40)
    except OSError:
        pass
print(sorted(dirs))
'''

#: Runs in the kernel: look for unix sockets wherever it can see, plus the paths given, and
#: send each a control-socket request. Prints the paths that answered like a control socket.
CONTROL_PROBE = r'''
import os, socket, stat
paths = set({paths!r})
seen = 0
for top in ("/tmp", "/run", "/var/run", "/home", "/dev/shm", os.getcwd()):
    for root, dirs, files in os.walk(top):
        if root.count(os.sep) - top.count(os.sep) >= 4 or seen > 20000:
            dirs[:] = []
        for name in files + dirs:
            seen += 1
            path = os.path.join(root, name)
            try:
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    paths.add(path)
            except OSError:
                pass
answered = []
for path in sorted(paths):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(3)
    try:
        s.connect(path)
        s.sendall(b'{{"op": "list"}}\n')
        if b'"ok"' in s.recv(65536):
            answered.append(path)
    except OSError:
        pass
    finally:
        s.close()
print("answered", answered)
'''

#: Runs in the kernel: connect to the test's listener at 127.0.0.1 and every alias.
LOOPBACK_PROBE = r'''
import socket
reached = []
for addr in ["127.0.0.1", *{aliases!r}]:
    try:
        socket.create_connection((addr, {port}), timeout=5).close()
        reached.append(addr)
    except OSError:
        pass
print("reached", reached)
'''

#: Runs in the kernel: fork children that wait, until forking fails or the bound is hit.
FORK_BOMB = r'''
import os, signal, time
children, limited = [], False
deadline = time.monotonic() + 60
while len(children) < {bound} and time.monotonic() < deadline:
    try:
        pid = os.fork()
    except OSError:
        limited = True
        break
    if pid == 0:
        time.sleep(120)
        os._exit(0)
    children.append(pid)
for pid in children:
    os.kill(pid, signal.SIGKILL)
for pid in children:
    os.waitpid(pid, 0)
print("forked", len(children), "limited", limited)
'''

#: Runs in the kernel: allocate and touch memory until refused, or the bound is reached.
MEMORY_BOMB = r'''
chunks, limited = [], False
try:
    while len(chunks) < {bound_mib} // 64:
        chunks.append(bytearray(64 << 20))
except MemoryError:
    limited = True
got = len(chunks) * 64
del chunks
print("allocated", got, "limited", limited)
'''

#: Runs in the kernel: fill the disk under its working directory until refused, or the bound is
#: reached; then remove the file. Incompressible data (zeros could stay sparse).
DISK_FILL = r'''
import errno, os
block = os.urandom(1 << 20)
written, full = 0, False
try:
    with open("sk-fill.bin", "wb") as f:
        while written < {bound_mib} << 20:
            f.write(block)
            written += len(block)
        f.flush()
        os.fsync(f.fileno())
except OSError as e:
    full = e.errno in (errno.ENOSPC, errno.EDQUOT)
if os.path.exists("sk-fill.bin"):
    os.remove("sk-fill.bin")
print("written", written >> 20, "full", full)
'''

#: Runs in the kernel: write to its own stdout/stderr file descriptors (bypassing Jupyter's
#: capture), then a burst through Jupyter's stdout.
OUTPUT_FLOOD = r'''
import os, sys
block = b"x" * (1 << 20)
written = 0
for fd in (1, 2):
    done = 0
    try:
        while done < {flood} // 2:
            done += os.write(fd, block)
    except OSError:
        pass
    written += done
for _ in range(64):
    sys.stdout.write("y" * (1 << 20))
sys.stdout.flush()
print("\nflooded", written)
'''


class HostileSuite:
    """Attacks every runtime must withstand."""

    @pytest.fixture
    def hostile(self) -> HostileRuntime:  # pragma: no cover - supplied by subclasses
        raise NotImplementedError

    @pytest.fixture
    def kernel(self, hostile: HostileRuntime, kernelspec_dir: Any, jp_asyncio_loop: Any) -> Iterator[Any]:
        kdir = kernelspec_dir(hostile.kernel_name, name="hostile", **hostile.config)
        km, kc = jp_asyncio_loop.run_until_complete(
            start("hostile", ksm=KernelSpecManager(kernel_dirs=[str(kdir)]),
                  timeout=hostile.start_timeout))
        try:
            yield km, kc
        finally:
            kc.stop_channels()
            if km.has_kernel:
                jp_asyncio_loop.run_until_complete(km.shutdown_kernel(now=True))
            assert not hostile.sandbox_exists(km.kernel_id), "sandbox left after shutdown"

    @pytest.fixture
    def canary(self, hostile: HostileRuntime, tmp_path: Path) -> Iterator[Path]:
        """A host file in a directory only its owner can enter; the attacks aim at it."""
        uid, gid = hostile.canary_owner
        home = tmp_path / "canary-home"
        home.mkdir(mode=0o700)
        path = home / "canary.txt"
        path.write_text("the host's own file\n")
        path.chmod(0o600)
        for p in (home, path):
            os.chown(p, uid, gid)
        yield path

    async def _cell(self, kc: Any, hostile: HostileRuntime, code: str, timeout: float | None = None) -> str:
        out = await run_cell(kc, code, timeout=timeout or hostile.exec_timeout)
        assert out["status"] == "ok", out
        return out["stdout"]

    async def _alive_and_working(self, km: Any, kc: Any, hostile: HostileRuntime) -> None:
        await kc.wait_for_ready(timeout=hostile.start_timeout)
        out = await run_cell(kc, "print(6 * 7)", timeout=hostile.exec_timeout)
        assert out["stdout"] == "42\n", out

    async def test_link_swaps_never_reach_host_files(self, kernel: Any, hostile: HostileRuntime,
                                                     canary: Path) -> None:
        from sandbox_kernels.snapshots.service import SnapshotService

        km, kc = kernel
        before = FileState.of(canary)
        attack = LINK_SWAP.format(canary=str(canary))
        service = SnapshotService(km.provisioner)
        snapshots = bool(service.capabilities().kinds)
        if snapshots:  # taken before any attack: what was planted must not count against it
            await service.create("before-attack")

        await self._cell(kc, hostile, attack)
        await km.restart_kernel(now=False)
        await self._alive_and_working(km, kc, hostile)
        assert FileState.of(canary) == before, "a restart wrote through a planted link"

        await self._cell(kc, hostile, attack)
        with watching_restarts(km) as restarts:
            kc.execute("import os; os._exit(3)")

            async def restarted() -> bool:
                return bool(restarts)

            assert await wait_until(restarted, timeout=hostile.start_timeout), "death not detected"
            await self._alive_and_working(km, kc, hostile)
        assert FileState.of(canary) == before, "an auto-restart wrote through a planted link"

        if snapshots:
            await self._cell(kc, hostile, attack)
            await service.rollback("before-attack")
            await self._alive_and_working(km, kc, hostile)
            assert FileState.of(canary) == before, "a rollback wrote through a planted link"
        await self._cell(kc, hostile, attack)
        await km.shutdown_kernel(now=False)
        assert FileState.of(canary) == before, "the shutdown wrote through a planted link"
        assert canary.parent.exists() and canary.exists()

    async def test_control_sockets_are_out_of_reach(self, kernel: Any, hostile: HostileRuntime) -> None:
        km, kc = kernel
        own = Path(km.provisioner.state_dir) / "control.sock"
        assert own.exists(), "the kernel's own control socket should be serving"
        out = await self._cell(kc, hostile, CONTROL_PROBE.format(paths=[str(own)]),
                               timeout=hostile.exec_timeout * 3)
        assert out.strip().endswith("answered []"), out

    async def test_host_loopback_is_out_of_reach(self, kernel: Any, hostile: HostileRuntime) -> None:
        _, kc = kernel
        listener = LoopbackListener()
        try:
            out = await self._cell(kc, hostile, LOOPBACK_PROBE.format(
                aliases=hostile.loopback_aliases, port=listener.port))
        finally:
            listener.close()
        assert out.strip() == "reached []", out
        assert listener.accepted == 0

    async def _attack_to_the_limit(self, km: Any, kc: Any, hostile: HostileRuntime, code: str,
                                   timeout: float, limited: bool, check: str) -> None:
        """Run a bomb; it may take the kernel down with it (out of memory, an evicted pod):
        then its death must be seen and the kernel restarted. If it returned and the sandbox
        has the limit, ``check`` (a cell printing what was reached and whether it was refused)
        must show the refusal. Either way the kernel works afterwards."""
        with watching_restarts(km) as restarts:
            outcome = await _reply_or_restart(kc, kc.execute(code), restarts, timeout)
            if outcome == "reply" and limited:
                out = await run_cell(kc, check, timeout=hostile.exec_timeout)
                assert out["stdout"].split()[-1] == "True", f"no limit stopped the attack: {out}"
            await self._alive_and_working(km, kc, hostile)

    async def test_fork_bomb_is_contained(self, kernel: Any, hostile: HostileRuntime) -> None:
        km, kc = kernel
        bound = 5000 if hostile.process_limit else 300
        await self._attack_to_the_limit(km, kc, hostile, FORK_BOMB.format(bound=bound), hostile.exec_timeout * 4,
                                        hostile.process_limit, f"print(len(children) < {bound} and limited)")

    async def test_memory_bomb_is_contained(self, kernel: Any, hostile: HostileRuntime) -> None:
        km, kc = kernel
        bound = 8192 if hostile.memory_limit else 1024
        await self._attack_to_the_limit(km, kc, hostile, MEMORY_BOMB.format(bound_mib=bound),
                                        hostile.start_timeout * 2, hostile.memory_limit, "print(limited)")

    async def test_disk_fill_is_contained(self, kernel: Any, hostile: HostileRuntime) -> None:
        km, kc = kernel
        bound = 8192 if hostile.disk_limit else 512
        await self._attack_to_the_limit(km, kc, hostile, DISK_FILL.format(bound_mib=bound),
                                        hostile.exec_timeout * 10, hostile.disk_limit,
                                        f"print(written >> 20 < {bound} and full)")

    async def test_output_flood_is_bounded(self, kernel: Any, hostile: HostileRuntime) -> None:
        km, kc = kernel
        received = 0

        def count(msg: dict[str, Any]) -> None:
            nonlocal received
            if msg["msg_type"] == "stream":
                received += len(msg["content"]["text"])

        reply = await kc.execute_interactive(OUTPUT_FLOOD.format(flood=hostile.flood_bytes),
                                             output_hook=count, timeout=hostile.exec_timeout * 10)
        assert reply["content"]["status"] == "ok", reply["content"]
        assert received >= 64 * MiB, "the flood through Jupyter's stdout did not arrive"
        if hostile.host_output_bytes is not None:
            kept = hostile.host_output_bytes(km.kernel_id)
            assert kept <= HOST_OUTPUT_CAP, f"the host kept {kept >> 20} MiB of the kernel's output"
        await self._alive_and_working(km, kc, hostile)
        text = await km.provisioner.diagnostics()
        assert len(text) <= 256 * 1024, "diagnostics read the flooded log unbounded"


class SnapshotAttacks:
    """For runtimes with snapshots (mixed in before :class:`HostileSuite`)."""

    async def test_randomness_differs_after_rollbacks(self, kernel: Any, hostile: HostileRuntime) -> None:
        """Two rollbacks to one snapshot must not hand out the same random bytes (keys, tokens,
        uuids made after a rollback would repeat): the guest's RNG is reseeded each time."""
        from sandbox_kernels.snapshots.service import SnapshotService

        km, kc = kernel
        service = SnapshotService(km.provisioner)
        await service.create("seed")
        samples = []
        for _ in range(2):
            await service.rollback("seed")
            await kc.wait_for_ready(timeout=hostile.start_timeout)
            out = await run_cell(kc, "import os, uuid; print(os.urandom(16).hex(), uuid.uuid4().hex)",
                                 timeout=hostile.exec_timeout)
            samples.append(out["stdout"].split())
        assert len(samples[0]) == 2 and samples[0][0] != samples[1][0], samples
        assert samples[0][1] != samples[1][1], samples


@contextlib.contextmanager
def watching_restarts(km: Any) -> Iterator[list[str]]:
    """The restarter a server runs, for the block: yields the list its restarts append to."""
    restarts: list[str] = []
    restarter = AsyncIOLoopKernelRestarter(kernel_manager=km, time_to_dead=1.0, parent=km)
    restarter.add_callback(lambda: restarts.append("restart"), "restart")
    restarter.start()
    try:
        yield restarts
    finally:
        restarter.stop()


async def _reply_or_restart(kc: Any, msg_id: str, restarts: list[str], timeout: float) -> str:
    """Wait until the request is answered ("reply") or the kernel died and was restarted."""
    import asyncio
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if restarts:
            return "restarted"
        with contextlib.suppress(Exception):
            msg = await kc.get_shell_msg(timeout=1)
            if msg["parent_header"].get("msg_id") == msg_id:
                return "reply"
        await asyncio.sleep(0)
    raise AssertionError("the bomb neither finished nor killed the kernel in time")

