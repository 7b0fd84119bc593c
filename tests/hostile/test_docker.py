"""Docker: code in the kernel attacks the host through everything the host shares with it.

Each test runs attack code inside a real kernel on the real Docker engine, drives the host
through restart, auto-restart, snapshot, rollback and shutdown, and asserts what must hold.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
from jupyter_client.ioloop.restarter import AsyncIOLoopKernelRestarter

from hostile.suite import HostileRuntime, HostileSuite
from lifecycle import run_cell, start, wait_until

pytestmark = [pytest.mark.hostile, pytest.mark.docker]

KERNEL = "sandbox-docker"
STEP_TIMEOUT = 180

#: Runs in the kernel: every directory shared with the host (bind mounts, the connection
#: file's directory), every entry in it swapped for a symlink to the canary (files) or its
#: directory (dirs), hard links where the kernel can make them, FIFOs, a 1 TiB sparse file,
#: and symlinks under every name the host might write. Prints what it managed to plant.
ATTACK = r'''
import json, os, stat, sys
CANARY, CANARY_DIR = {canary!r}, {canary_dir!r}
NAMES = {{"connection.json", "connection.json.tmp", "control.sock", "kernel.log", "k"}}

def shared_dirs():
    dirs = set()
    for line in open("/proc/self/mountinfo"):
        pre, _, post = line.partition(" - ")
        fields = pre.split()
        root, point, fstype = fields[3], fields[4].replace("\\040", " "), post.split()[0]
        if root != "/" and fstype not in ("proc", "sysfs") and os.path.isdir(point):  # a bind mount
            dirs.add(point)
    if "-f" in sys.argv:
        dirs.add(os.path.dirname(sys.argv[sys.argv.index("-f") + 1]))
    for d in list(dirs):  # and the directories above them, as far as the kernel gets
        while d not in ("/", ""):
            d = os.path.dirname(d)
            dirs.add(d)
    dirs.discard("/")
    return sorted(dirs)

planted, refused = [], []

def attempt(what, path, fn):
    try:
        fn()
        planted.append([what, path])
    except OSError as e:
        refused.append([what, path, e.errno])

def swap(path, target):
    tmp = path + ".swap"
    def go():
        os.symlink(target, tmp)
        try:
            os.rename(tmp, path)
        except OSError:
            os.unlink(tmp)
            raise
    attempt("symlink", path, go)

def attack(d, depth=0):
    try:
        names = os.listdir(d)
    except OSError as e:
        refused.append(["list", d, e.errno])
        return
    NAMES.update(n for n in names if not n.endswith(".swap"))
    for name in names:
        path = os.path.join(d, name)
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            if depth < 4 and not os.path.ismount(path):
                attack(path, depth + 1)
            swap(path, CANARY_DIR)
        else:
            if not stat.S_ISLNK(st.st_mode):
                attempt("hardlink", path + ".hl", lambda: os.link(path, path + ".hl"))
            swap(path, CANARY)
    for name in sorted(NAMES):
        path = os.path.join(d, name)
        if not os.path.lexists(path):
            attempt("symlink", path, lambda: os.symlink(CANARY, path))
    attempt("hardlink", os.path.join(d, "canary.hl"),
            lambda: os.link(CANARY, os.path.join(d, "canary.hl")))
    attempt("dirlink", os.path.join(d, "canary-dir"),
            lambda: os.symlink(CANARY_DIR, os.path.join(d, "canary-dir")))
    attempt("fifo", os.path.join(d, "planted.fifo"), lambda: os.mkfifo(os.path.join(d, "planted.fifo")))
    def sparse():
        with open(os.path.join(d, "planted.sparse"), "xb") as f:
            f.truncate(1 << 40)
    attempt("sparse", os.path.join(d, "planted.sparse"), sparse)

for d in shared_dirs():
    attack(d)
print(json.dumps({{"planted": planted, "refused": refused}}))
'''

#: Runs in the kernel: remove the sparse files the attack left in the container's own files.
REMOVE_SPARSE = r'''
import glob, os
for path in glob.glob("/tmp/**/planted.sparse*", recursive=True) + glob.glob("planted.sparse*"):
    os.unlink(path)
'''


@dataclass
class Canary:
    """A file in a host directory only its owner can enter, that no kernel may touch."""

    path: Path

    @property
    def directory(self) -> Path:
        return self.path.parent

    def state(self) -> dict[str, Any]:
        st, dst = os.lstat(self.path), os.lstat(self.directory)
        return {"content": self.path.read_bytes(), "file": (st.st_uid, st.st_gid, st.st_mode, st.st_nlink),
                "dir": (dst.st_uid, dst.st_gid, dst.st_mode),
                "listing": sorted(os.listdir(self.directory))}

    def check(self, before: dict[str, Any], step: str) -> None:
        assert self.state() == before, f"{step}: a host file outside the sandbox changed"


def _make_canary(owner: tuple[int, int] = (0, 0)) -> Canary:
    directory = Path(tempfile.mkdtemp(prefix="sandbox-hostile-canary-"))
    path = directory / "canary.txt"
    path.write_bytes(f"canary {uuid.uuid4()}\n".encode())
    os.chmod(path, 0o600)
    os.chown(path, *owner)
    os.chmod(directory, 0o700)
    os.chown(directory, *owner)
    return Canary(path)


def _remove_canary(canary: Canary) -> None:
    for name in os.listdir(canary.directory):
        os.unlink(canary.directory / name)
    os.rmdir(canary.directory)


@pytest.fixture
def canary() -> Iterator[Canary]:
    canary = _make_canary()
    try:
        yield canary
    finally:
        _remove_canary(canary)


async def _attack(kc: Any, canary: Canary) -> dict[str, Any]:
    out = await run_cell(kc, ATTACK.format(canary=str(canary.path), canary_dir=str(canary.directory)),
                         timeout=STEP_TIMEOUT)
    assert out["status"] == "ok", out
    report = json.loads(out["stdout"].strip().splitlines()[-1])
    assert report["planted"], f"the attack reached nothing, so proves nothing: {report}"
    return report


async def _works(kc: Any) -> None:
    await kc.wait_for_ready(timeout=STEP_TIMEOUT)
    out = await run_cell(kc, "print(6 * 7)", timeout=STEP_TIMEOUT)
    assert out["stdout"] == "42\n", out


def _docker_ids(kind: str, kernel_id: str) -> list[str]:
    cmd = ["docker", kind, "-q", "--filter", f"label=sandbox-kernels.kernel-id={kernel_id}"]
    if kind == "ps":
        cmd.insert(2, "-a")
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=60).stdout.split()


async def drive_attacked_kernel(canary: Canary) -> None:
    """Attack, then restart; attack, then die and auto-restart; attack, snapshot, attack, roll
    back; attack, shut down. The canary must hold after each step, the kernel work after each."""
    from sandbox_kernels.errors import SandboxQuotaExceeded
    from sandbox_kernels.snapshots.service import SnapshotService

    before = canary.state()
    km, kc = await start(KERNEL, timeout=STEP_TIMEOUT)
    kid, state_dir = km.kernel_id, km.provisioner.state_dir
    restarter = AsyncIOLoopKernelRestarter(kernel_manager=km, time_to_dead=1.0, parent=km)
    try:
        uid = await run_cell(kc, "import os; print(os.getuid())", timeout=STEP_TIMEOUT)
        print(f"server uid {os.getuid()}, kernel uid {uid['stdout'].strip()}", flush=True)
        # 1. restart, as Lab's button does
        await _attack(kc, canary)
        try:
            await asyncio.wait_for(km.restart_kernel(now=False), STEP_TIMEOUT)
        finally:
            canary.check(before, "restart")
        await _works(kc)

        # 2. the kernel dies; the auto-restarter brings it back
        await _attack(kc, canary)
        restarts: list[str] = []
        restarter.add_callback(lambda: restarts.append("restart"), "restart")
        restarter.start()
        kc.execute("import os; os._exit(3)")

        async def restarted() -> bool:
            return bool(restarts)

        try:
            assert await wait_until(restarted, timeout=STEP_TIMEOUT), "kernel death not detected"
            await _works(kc)
        finally:
            restarter.stop()
            canary.check(before, "auto-restart")

        # 3. a filesystem snapshot of an attacked sandbox, attacked again, rolled back. The
        # 1 TiB sparse files in the container's own /tmp would be written out whole: refused
        # before anything is written. Without them, the snapshot is taken.
        service = SnapshotService(km.provisioner)
        await _attack(kc, canary)
        try:
            with pytest.raises(SandboxQuotaExceeded, match="snapshot_max_bytes"):
                await asyncio.wait_for(service.create("sparse"), STEP_TIMEOUT)
            assert not _docker_ids("images", kid), "a refused snapshot left an image"
            await run_cell(kc, REMOVE_SPARSE, timeout=STEP_TIMEOUT)
            await asyncio.wait_for(service.create("attacked"), STEP_TIMEOUT)
            await _attack(kc, canary)
            await asyncio.wait_for(service.rollback("attacked"), STEP_TIMEOUT)
        finally:
            canary.check(before, "snapshot and rollback")
        await _works(kc)

        # 4. shutdown of an attacked sandbox
        await _attack(kc, canary)
    finally:
        restarter.stop()
        kc.stop_channels()
        await asyncio.wait_for(km.shutdown_kernel(now=True), STEP_TIMEOUT)
    canary.check(before, "shutdown")
    assert not state_dir.exists(), "the kernel's state directory was left behind"
    assert not _docker_ids("ps", kid), "container left behind"
    assert not _docker_ids("images", kid), "snapshot images left behind"


async def test_symlinks_fifos_and_links_in_shared_dirs_do_not_reach_the_host(canary: Canary) -> None:
    await drive_attacked_kernel(canary)


#: A server user that is not root: nobody, in the docker group (as a JupyterHub single-user
#: server would be). Its kernels' containers run as its own uid.
_NOBODY = (65534, 65534)


async def test_non_root_server_keeps_its_own_files() -> None:
    """The same attack against a server run as a non-root user: its files stay its own."""
    import grp
    import shutil
    import sys

    home = Path(tempfile.mkdtemp(prefix="sandbox-hostile-home-"))
    os.chown(home, *_NOBODY)
    canary = _make_canary(_NOBODY)
    before = canary.state()
    tests = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HOME": str(home), "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
           "SANDBOX_KERNELS_STATE_DIR": str(home / "state"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(tests), os.environ.get("PYTHONPATH")]))}
    script = ("import asyncio, sys\nfrom pathlib import Path\n"
              "from hostile.test_docker import Canary, drive_attacked_kernel\n"
              "asyncio.run(drive_attacked_kernel(Canary(Path(sys.argv[1]))))\n")
    try:
        proc = await asyncio.create_subprocess_exec(
            "setpriv", f"--reuid={_NOBODY[0]}", f"--regid={_NOBODY[1]}",
            f"--groups={grp.getgrnam('docker').gr_gid}", "--", sys.executable, "-c", script,
            str(canary.path), cwd=str(home), env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), STEP_TIMEOUT * 6)
        canary.check(before, "non-root server")
        assert proc.returncode == 0, out.decode(errors="replace")[-6000:]
        assert b"server uid 65534, kernel uid 65534" in out, out[-2000:]
    finally:
        _remove_canary(canary)
        shutil.rmtree(home, ignore_errors=True)


#: Runs in the kernel: every unix socket it can see (a walk of its whole filesystem), every
#: path named control.sock, and control.sock in every directory above the paths it knows (its
#: connection file, its ipc sockets, and those the test hands it), each sent a control request.
CONTROL_PROBE = r'''
import json, os, socket, stat, sys
cf = sys.argv[sys.argv.index("-f") + 1]
info = json.load(open(cf))
own = set()
if info.get("transport") == "ipc":
    own = {{"%s-%s" % (info["ip"], info[k]) for k in info if k.endswith("_port")}}
candidates = set({known!r})
for path in [cf, info.get("ip", "")] + sorted(candidates):
    d = os.path.dirname(path)
    while d not in ("/", ""):
        candidates.add(os.path.join(d, "control.sock"))
        d = os.path.dirname(d)
named, found = [], []
for top, dirs, files in os.walk("/"):
    if top == "/":
        dirs[:] = [d for d in dirs if d not in ("proc", "sys", "dev")]
    for name in dirs + files:
        path = os.path.join(top, name)
        if name == "control.sock":
            named.append(path)
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode) and path not in own:
                found.append(path)
        except OSError:
            pass
answers = {{}}
for path in sorted(candidates | set(named) | set(found)):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    try:
        s.connect(path)
        s.sendall(b'{{"op": "list"}}\n')
        answers[path] = "answered: " + s.recv(4096).decode(errors="replace")
    except OSError as e:
        answers[path] = "errno %d" % e.errno
    finally:
        s.close()
print(json.dumps({{"named": named, "found": found, "answers": answers}}))
'''


async def test_control_socket_is_out_of_reach() -> None:
    from sandbox_kernels.settings import default_state_root

    km, kc = await start(KERNEL, timeout=STEP_TIMEOUT)
    try:
        control = km.provisioner.state_dir / "control.sock"
        assert stat.S_ISSOCK(os.lstat(control).st_mode), "the host serves the control socket"
        known = [str(control), str(Path(default_state_root()) / km.kernel_id / "control.sock")]
        out = await run_cell(kc, CONTROL_PROBE.format(known=known), timeout=STEP_TIMEOUT)
        assert out["status"] == "ok", out
        probe = json.loads(out["stdout"].strip().splitlines()[-1])
        assert str(control) in probe["answers"], "the probe tried the host's own path"
        assert probe["named"] == [], f"a control socket is visible in the sandbox: {probe['named']}"
        assert probe["found"] == [], f"unix sockets other than the kernel's own are visible: {probe['found']}"
        reached = {p: a for p, a in probe["answers"].items() if not a.startswith("errno")}
        assert not reached, f"the kernel reached: {reached}"
    finally:
        kc.stop_channels()
        await asyncio.wait_for(km.shutdown_kernel(now=True), STEP_TIMEOUT)


@pytest.fixture
def jp_server_config() -> dict[str, Any]:
    return {"ServerApp": {"jpserver_extensions": {"jupyter_server_ext": True}}}


async def test_snapshot_quota_counts_kept_snapshots(jp_fetch: Any, jp_serverapp: Any,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the quota: 409 naming the setting over REST, the same error over the control
    socket and the CLI; kept snapshots count; a snapshot over the bytes is removed again."""
    import sys

    from sandbox_kernels.errors import SandboxQuotaExceeded
    from sandbox_kernels.snapshots.control import SnapshotClient
    from helpers.server_api import api as _api, api_status as _status, start_server_kernel as _start

    monkeypatch.setenv("SANDBOX_KERNELS_SNAPSHOT_MAX_COUNT", "2")
    monkeypatch.setenv("SANDBOX_KERNELS_SNAPSHOT_MAX_BYTES", "8m")
    kid, kc = await _start(jp_fetch, jp_serverapp, KERNEL)
    snapshots = ("kernels", kid, "snapshots")
    try:
        await _api(jp_fetch, *snapshots, method="POST", body={"name": "kept1", "keep": True})
        await _api(jp_fetch, *snapshots, method="POST", body={"name": "s2"})
        code, msg = await _status(jp_fetch, *snapshots, method="POST", body={"name": "s3"})
        assert code == 409, (code, msg)
        assert "snapshot_max_count=2" in msg and "kept snapshots count" in msg and "Delete" in msg, msg

        with pytest.raises(SandboxQuotaExceeded, match="snapshot_max_count=2"):
            await asyncio.to_thread(SnapshotClient(kid).create, "s3")
        cli = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "sandbox-kernels"), "snapshot", "create", kid, "s3",
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _, err = await asyncio.wait_for(cli.communicate(), STEP_TIMEOUT)
        assert cli.returncode == 2 and b"snapshot_max_count=2" in err, err

        # Deleting the unkept one makes room for one; the kept one still counts.
        await _api(jp_fetch, *snapshots, "s2", method="DELETE")
        await _api(jp_fetch, *snapshots, method="POST", body={"name": "s3"})
        assert (await _status(jp_fetch, *snapshots, method="POST", body={"name": "s4"}))[0] == 409
        await _api(jp_fetch, *snapshots, "s3", method="DELETE")

        # Bytes: 16 MiB written in the container would go over 8m: refused before the commit.
        await run_cell(kc, "import os\nopen('big.bin', 'wb').write(os.urandom(16 << 20))")
        code, msg = await _status(jp_fetch, *snapshots, method="POST", body={"name": "big"})
        assert code == 409 and "snapshot_max_bytes" in msg and "nothing was written" in msg, (code, msg)
        listing = await _api(jp_fetch, *snapshots)
        assert [s["name"] for s in listing["snapshots"]] == ["kept1"]
    finally:
        kc.stop_channels()
        await jp_fetch("api", "kernels", kid, method="DELETE")
        kept = _docker_ids("images", kid)
        if kept:
            subprocess.run(["docker", "rmi", "-f", *kept], capture_output=True, timeout=120)
    assert len(kept) == 1, f"only the kept snapshot outlives its kernel: {kept}"


def _log_bytes(kernel_id: str) -> int:
    """Size of the container's log files on the host (json-file driver, rotated ones too)."""
    (cid,) = _docker_ids("ps", kernel_id)
    path = subprocess.run(["docker", "inspect", "-f", "{{.LogPath}}", cid], capture_output=True,
                          text=True, check=True, timeout=30).stdout.strip()
    directory = os.path.dirname(path)
    return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)
               if f.startswith(os.path.basename(path)))


class TestDockerHostile(HostileSuite):
    """The shared hostile suite (tests/hostile/suite.py) on the Docker runtime."""

    @pytest.fixture
    def hostile(self) -> HostileRuntime:
        return HostileRuntime(kernel_name=KERNEL, sandbox_exists=lambda kid: bool(_docker_ids("ps", kid)),
                              start_timeout=STEP_TIMEOUT, exec_timeout=STEP_TIMEOUT, flood_bytes=1 << 30,
                              host_output_bytes=_log_bytes)


#: Runs in the kernel: swap each of its sockets for a symlink to a host socket, then die, so the
#: clients' ZMQ reconnects follow the links (if the host let them).
REDIRECT = r'''
import json, os, sys
info = json.load(open(sys.argv[sys.argv.index("-f") + 1]))
for ch in ("shell", "iopub", "stdin", "control", "hb"):
    path = f"{{info['ip']}}-{{info[ch + '_port']}}"
    os.symlink({target!r}, path + ".swap")
    os.replace(path + ".swap", path)
os._exit(1)
'''


async def test_sockets_swapped_for_symlinks_do_not_redirect_the_clients(tmp_path: Path) -> None:
    """The clients reconnect to the kernel's socket paths by name: a kernel that swaps them for
    symlinks to another socket of the host must not get the server's connections sent there."""
    import socket
    import threading

    target = tmp_path / "host-service.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(target))
    server.listen(16)
    server.settimeout(0.2)
    accepted: list[int] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            accepted.append(1)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    km, kc = await start(KERNEL, timeout=STEP_TIMEOUT)
    restarts: list[str] = []
    restarter = AsyncIOLoopKernelRestarter(kernel_manager=km, time_to_dead=1.0, parent=km)
    restarter.add_callback(lambda: restarts.append("restart"), "restart")
    restarter.start()
    try:
        kc.execute(REDIRECT.format(target=str(target)))

        async def restarted() -> bool:
            return bool(restarts)

        assert await wait_until(restarted, timeout=STEP_TIMEOUT), "the kernel's death was not detected"
        await _works(kc)
        assert accepted == [], f"the clients connected {len(accepted)} times to a socket the kernel chose"
    finally:
        restarter.stop()
        stop.set()
        thread.join(5)
        server.close()
        kc.stop_channels()
        await km.shutdown_kernel(now=True)
