"""Attacks on the SSH host runtime from another user of the host and from the kernel itself.

Issue 10, finding 3: on a shared host another user (``sk-other``) must not be able to plant or
redirect a kernel's files; finding 7: nothing secret travels in a command line, and nothing the
host reads back from the remote (pids, exit codes, ports, logs) can make it read unbounded data
or fail outside the SandboxError tree.

The "remote host" is this machine (sshd in a network namespace, logging in as ``sk-tester``),
so the tests can look at its files and at every process's ``/proc/<pid>/cmdline``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from traitlets.config import Config

from helpers.ssh_host import USER, ensure_user, kernel_dirs, ssh_host as running_ssh_host
from hostile.suite import HostileRuntime, HostileSuite
from lifecycle import REPO, run_cell, wait_until
from sandbox_kernels.errors import SandboxConfigError, SandboxError, SandboxStartError
from sandbox_kernels.remote.kernel import parse_ports as _ports

pytestmark = [pytest.mark.hostile, pytest.mark.ssh]

OTHER = "sk-other"
#: Where the runtime used to put USER's kernel directories: any user can create it first.
OLD_ROOT = Path(f"/tmp/sandbox-kernels-{USER}")
MiB = 1 << 20


@pytest.fixture(scope="module")
def ssh_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    if os.geteuid() != 0:
        pytest.skip("needs root to add the test users and run sshd")
    with running_ssh_host(tmp_path_factory.mktemp("sshd"), tag="sshh") as env:
        yield env


@pytest.fixture(scope="module")
def other() -> pwd.struct_passwd:
    """Another local user of the SSH host."""
    return ensure_user(OTHER)


def _as_other(argv: list[str], **kwargs: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(["setpriv", f"--reuid={OTHER}", f"--regid={OTHER}", "--init-groups", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/", **kwargs)


def _run_as_other(argv: list[str]) -> str:
    proc = _as_other(argv)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return out


def _kernelspec(tmp_path: Path, env: dict[str, str] | None = None) -> KernelSpecManager:
    spec = json.loads((REPO / "kernelspecs" / "sandbox-ssh" / "kernel.json").read_text())
    spec["env"] = env or {}
    target = tmp_path / "kernels" / "hostile-ssh"
    target.mkdir(parents=True)
    (target / "kernel.json").write_text(json.dumps(spec))
    return KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])


async def _start(ksm: KernelSpecManager, kernel_id: str | None = None, config: Config | None = None,
                 timeout: float = 120) -> tuple[AsyncKernelManager, Any]:
    km = AsyncKernelManager(kernel_name="hostile-ssh", kernel_spec_manager=ksm, config=config or Config())
    await km.start_kernel(**({"kernel_id": kernel_id} if kernel_id else {}))
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=timeout)
    except BaseException:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)
        raise
    return km, kc


async def _stop(km: AsyncKernelManager, kc: Any) -> None:
    kc.stop_channels()
    if km.has_kernel:
        await km.shutdown_kernel(now=True)
    assert not kernel_dirs(km.kernel_id), "kernel directory left after shutdown"


def _state(path: Path) -> tuple[bytes, int, int, int]:
    st = os.lstat(path)
    data = os.readlink(path).encode() if stat.S_ISLNK(st.st_mode) else path.read_bytes()
    return data, st.st_uid, st.st_mode, st.st_nlink


# ---------------------------------------------------------------- finding 3: another user


#: Runs as OTHER: wait for the victim's connection file in the kernel directory OTHER's
#: world-writable parent holds, then swap the whole directory for OTHER's planted one (their
#: key in connection.json, kernel.log a symlink to OTHER's file). Bounded by argv[4] seconds.
SWAPPER = r"""
import os, sys, time
parent, kid, planted, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
kdir = os.path.join(parent, kid)
deadline = time.monotonic() + seconds
print("watching", flush=True)
while time.monotonic() < deadline:
    try:
        owner = os.lstat(os.path.join(kdir, "connection.json")).st_uid
    except OSError:
        owner = None
    if owner is not None and owner != os.getuid():
        os.rename(kdir, kdir + ".victim")
        os.rename(planted, kdir)
        print("swapped", flush=True)
        break
    time.sleep(0.002)
"""


async def test_another_user_cannot_plant_or_redirect_kernel_files(ssh_host: dict[str, str], other: Any,
                                                                  tmp_path: Path) -> None:
    kid = str(uuid.uuid4())
    shutil.rmtree(OLD_ROOT, ignore_errors=True)
    # OTHER takes the old default parent first, and readies a directory of their own: a
    # connection file with their key, and kernel.log pointing at a file of theirs that the
    # victim could write.
    target = Path(f"/tmp/{OTHER}-target-{kid[:8]}")
    planted = OLD_ROOT / f".planted-{kid}"
    _run_as_other(["sh", "-c", 'umask 0 && mkdir -p "$1" && chmod 777 "$1" && mkdir -m 1777 "$2" '
                   '&& printf untouched > "$3" && chmod 666 "$3" && ln -s "$3" "$2/kernel.log" '
                   '&& printf "%s" "$4" > "$2/connection.json"', "plant", str(OLD_ROOT), str(planted),
                   str(target), json.dumps({"key": "other-users-key", "ip": "127.0.0.1", "transport": "tcp",
                                            "signature_scheme": "hmac-sha256", "shell_port": 0})])
    _run_as_other(["mkdir", "-m", "777", str(OLD_ROOT / kid)])
    before = {p: _state(p) for p in (target, planted / "kernel.log", planted / "connection.json")}
    swapper = _as_other([sys.executable, "-c", SWAPPER, str(OLD_ROOT), kid, str(planted), "120"])
    try:
        assert swapper.stdout is not None
        assert (await asyncio.to_thread(swapper.stdout.readline)).strip() == "watching"
        km, kc = await _start(_kernelspec(tmp_path), kernel_id=kid, timeout=120)
        try:
            out = await run_cell(kc, "from ipykernel.connect import get_connection_file as f; print(f())")
            assert out["status"] == "ok", out
            connection = Path(out["stdout"].strip())
            [kdir] = kernel_dirs(kid)
            assert connection.parent == kdir
            user = pwd.getpwnam(USER)
            for path in (kdir, connection):
                st = os.lstat(path)
                assert st.st_uid == user.pw_uid and stat.S_IMODE(st.st_mode) & 0o077 == 0, path
            assert json.loads(connection.read_text())["key"] == km.session.key.decode()
            log = kdir / "kernel.log"
            assert stat.S_ISREG(os.lstat(log).st_mode) and os.lstat(log).st_uid == user.pw_uid
        finally:
            await _stop(km, kc)
    finally:
        swapper.kill()
        swapper.wait(30)
        after = {p: _state(p) for p in before if os.path.lexists(p)}
        shutil.rmtree(OLD_ROOT, ignore_errors=True)
        target.unlink(missing_ok=True)
    assert after == before, "the kernel wrote into, or removed, another user's files"
    assert not (OLD_ROOT / f"{kid}.victim").exists()


@pytest.mark.parametrize("case", ["world-writable", "other-users-dir-in-tmp", "other-users-component"])
async def test_remote_root_other_users_can_change_is_refused(ssh_host: dict[str, str], other: Any,
                                                              tmp_path: Path, case: str) -> None:
    """An admin's remote_root is checked component by component; the error names it."""
    tag = uuid.uuid4().hex[:8]
    if case == "world-writable":  # root's own directory, but anyone may write it (no sticky bit)
        base = root = Path(f"/srv/sk-root-{tag}")
        base.mkdir()
        base.chmod(0o777)
    elif case == "other-users-dir-in-tmp":  # /tmp is sticky: the next part must be USER's own
        base = root = Path(f"/tmp/sk-root-{tag}")
        _run_as_other(["mkdir", "-m", "755", str(base)])
    else:  # one component on the way belongs to OTHER, who can swap what is below it
        base = Path(f"/srv/sk-root-{tag}")
        base.mkdir(mode=0o755)
        (base / "shared").mkdir(mode=0o755)
        os.chown(base / "shared", other.pw_uid, other.pw_gid)
        root = base / "shared" / "kernels"
        root.mkdir(mode=0o755)
    config = Config({"SSHHostProvisioner": {"remote_root": str(root)}})
    try:
        with pytest.raises(SandboxConfigError, match="remote_root") as info:
            km, kc = await _start(_kernelspec(tmp_path), config=config, timeout=60)
            await _stop(km, kc)  # only reached by code that accepts the directory
        assert str(root) in str(info.value), info.value
        assert list(root.iterdir()) == [], "a kernel directory was made there anyway"
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def test_remote_root_in_a_sticky_directory_is_accepted(ssh_host: dict[str, str], tmp_path: Path) -> None:
    """/tmp itself (root-owned, sticky): the kernel directory is a fresh 0700 one of USER's."""
    config = Config({"SSHHostProvisioner": {"remote_root": "/tmp"}})
    km, kc = await _start(_kernelspec(tmp_path), config=config)
    try:
        out = await run_cell(kc, "from ipykernel.connect import get_connection_file as f; print(f())")
        kdir = Path(out["stdout"].strip()).parent
        assert kdir.parent == Path("/tmp") and kdir.name.startswith(f"{km.kernel_id}.")
        st = os.lstat(kdir)
        # 0700 (the kernel itself adds the sticky bit, as jupyter_client does for its connection files)
        assert st.st_uid == pwd.getpwnam(USER).pw_uid and stat.S_IMODE(st.st_mode) & 0o777 == 0o700
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)
    assert not kdir.exists()


# ---------------------------------------------------------------- finding 7: command lines


def _cmdlines_holding(secret: bytes) -> list[str]:
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                data = f.read()
        except OSError:
            continue
        if secret in data:
            found.append(f"{entry.name}: {data[:200]!r}")
    return found


async def test_environment_values_never_appear_in_a_command_line(ssh_host: dict[str, str],
                                                                  tmp_path: Path) -> None:
    secret = f"sk-secret-{uuid.uuid4().hex}"
    seen: list[str] = []
    stop = threading.Event()

    def scan() -> None:  # all through the start: the launch commands are short-lived
        while not stop.is_set() and len(seen) < 10:
            seen.extend(_cmdlines_holding(secret.encode()))

    scanner = threading.Thread(target=scan, daemon=True)
    scanner.start()
    try:
        km, kc = await _start(_kernelspec(tmp_path, env={"SK_SECRET": secret}))
        try:
            out = await run_cell(kc, "import os; print(os.environ['SK_SECRET'])")
            assert out["stdout"] == f"{secret}\n", out  # the value did arrive
            stop.set()
            scanner.join(30)
            seen.extend(_cmdlines_holding(secret.encode()))  # and while the kernel runs
            [kdir] = kernel_dirs(km.kernel_id)
            assert not (kdir / "kernel.log.env").exists(), "the environment file was left behind"
        finally:
            await _stop(km, kc)
    finally:
        stop.set()
        scanner.join(30)
    assert seen == [], seen


def _holds_secret(data: bytes, secret: bytes) -> bool:
    """Whether a command line holds ``secret``, as is or inside a base64 word."""
    if secret in data:
        return True
    for word in data.split(b"\0"):
        try:
            if secret in base64.b64decode(word, validate=True):
                return True
        except ValueError:
            pass
    return False


#: Stands in for the VM's kernel preloader (kernel_preloader.py) on the SSH host: answers one
#: fork request with its own pid, keeping the request for the test to read.
FAKE_PRELOADER = r"""
d=$1 i=0
while [ ! -e "$d/fork-request" ] && [ "$i" -lt 3000 ]; do sleep 0.02; i=$((i + 1)); done
mv "$d/fork-request" "$d/request-seen"
echo "$$" > "$d/fork-reply.tmp" && mv "$d/fork-reply.tmp" "$d/fork-reply"
sleep 120
"""


async def test_fork_request_environment_never_appears_in_a_command_line(ssh_host: dict[str, str]) -> None:
    """The preloader path (VM kernels): the connection file and the fork request, which carry
    the key and the environment, travel on stdin."""
    from jupyter_client.kernelspec import KernelSpec

    from sandbox_kernels.runtimes.ssh.provisioner import SSHHostProvisioner

    secret = f"sk-fork-secret-{uuid.uuid4().hex}".encode()
    spec = KernelSpec(argv=["python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                      display_name="fork", language="python", env={})
    prov = SSHHostProvisioner(kernel_id=str(uuid.uuid4()), kernel_spec=spec)
    seen: list[str] = []
    stop = threading.Event()

    def scan() -> None:
        while not stop.is_set() and len(seen) < 10:
            for entry in os.scandir("/proc"):
                if entry.name.isdigit():
                    try:
                        data = Path(f"/proc/{entry.name}/cmdline").read_bytes()
                    except OSError:
                        continue
                    if _holds_secret(data, secret):
                        seen.append(f"{entry.name}: {data[:200]!r}")

    try:
        tunnel = await prov.tunnel_ready()
        await prov.prepare_remote_dir(tunnel)
        rdir = prov.remote_dir()
        kernel = await prov.remote_kernel()
        kernel.preload = True  # as in a VM
        kernel.state.preloader_pid = await asyncio.to_thread(
            tunnel.start_detached, ["sh", "-c", FAKE_PRELOADER, "fake-preloader", rdir], f"{rdir}/preloader.log")
        scanner = threading.Thread(target=scan, daemon=True)
        scanner.start()
        try:
            await kernel.start(["python3", "-m", "ipykernel_launcher", "-f", prov.sandbox_connection_file()],
                               {"SK_SECRET": secret.decode()}, {"key": secret.decode()})
            child = kernel.state.pid or 0
        finally:
            stop.set()
            scanner.join(30)
        assert child > 1
        request = json.loads(Path(rdir, "request-seen").read_text())
        assert request["env"] == {"SK_SECRET": secret.decode()}
        assert secret in Path(rdir, "connection.json").read_bytes()
        assert seen == [], seen
    finally:
        stop.set()
        if prov.kernel_state.preloader_pid is not None:
            prov.pid = prov.kernel_state.preloader_pid  # destroy_sandbox kills it with the directory
        await prov.destroy_sandbox()


# ---------------------------------------------------------------- finding 7: bounded reads


def test_numbers_from_the_remote_are_bounded() -> None:
    from sandbox_kernels.ssh.processes import parse_int

    assert parse_int(" 4242\n", "a pid") == 4242
    for bad in ("9" * 5000, "²", "-1", "+1", "1_000", "", "12 34", "0x10", "٣"):
        with pytest.raises(SandboxError):
            parse_int(bad, "a pid")


def test_hostile_connection_files_end_in_sandbox_errors() -> None:
    good = {f"{ch}_port": 40000 + i for i, ch in enumerate(("shell", "iopub", "stdin", "control", "hb"))}
    assert _ports(json.dumps(good).encode()) == {k[:-5]: v for k, v in good.items()}
    assert _ports(b'{"shell_port": 1') is None  # being written: ask again
    assert _ports(json.dumps({**good, "hb_port": 0}).encode()) is None
    assert _ports(b"[" * 60000) is None  # deep nesting: no RecursionError escapes
    hostile = [b"x" * (1 << 20), json.dumps({**good, "shell_port": "1" * 5000}).encode(),
               json.dumps({**good, "shell_port": 70000}).encode(), json.dumps({**good, "iopub_port": -5}).encode(),
               json.dumps({**good, "hb_port": True}).encode(), json.dumps({**good, "stdin_port": 1e400}).encode(),
               json.dumps({**good, "control_port": [1]}).encode(), b"[1, 2]", b'"text"']
    for raw in hostile:
        with pytest.raises(SandboxStartError):
            _ports(raw)


#: Runs in the kernel: make the exit-status file the wrapper writes a symlink to a read-only
#: 8 MB number (the wrapper's own write then fails), and exit.
GIANT_EXIT = r"""
import os
from ipykernel.connect import get_connection_file
d = os.path.dirname(get_connection_file())
big = os.path.join(d, "big-number")
with open(big, "w") as f:
    f.write("9" * (8 << 20))
os.chmod(big, 0o444)
os.symlink(big, os.path.join(d, "kernel.log.exit"))
os._exit(3)
"""

#: Runs in the kernel: append one 70 MB line to its own log, then a marker.
HUGE_LOG = r"""
import os
from ipykernel.connect import get_connection_file
with open(os.path.join(os.path.dirname(get_connection_file()), "kernel.log"), "ab") as f:
    for _ in range(70):
        f.write(b"x" * (1 << 20))
    f.write(b"END-OF-THE-FLOOD")
print("flooded")
"""


async def test_huge_kernel_log_is_read_by_its_tail(ssh_host: dict[str, str], tmp_path: Path) -> None:
    km, kc = await _start(_kernelspec(tmp_path))
    try:
        out = await run_cell(kc, HUGE_LOG, timeout=120)
        assert out["stdout"] == "flooded\n", out
        text = await km.provisioner.diagnostics()
        assert "END-OF-THE-FLOOD" in text[-1000:], text[-300:]  # the tail, not an error
        assert len(text) <= 64 * 1024
    finally:
        await _stop(km, kc)


async def test_giant_exit_status_is_a_death_not_a_crash(ssh_host: dict[str, str], tmp_path: Path) -> None:
    km, kc = await _start(_kernelspec(tmp_path))
    try:
        kc.execute(GIANT_EXIT)

        async def dead() -> bool:
            return await km.provisioner.poll() is not None  # must not raise

        assert await wait_until(dead, timeout=60), "the kernel's death was not noticed"
        assert await km.provisioner.poll() == -1  # gone: no believable exit status
        [kdir] = kernel_dirs(km.kernel_id)
        pid = km.provisioner.pid
        status = await asyncio.to_thread(km.provisioner.tunnel.process_status, pid, str(kdir / "kernel.log"))
        assert status.state == "gone"
    finally:
        await _stop(km, kc)


# ---------------------------------------------------------------- the shared suite


class TestSSHHostile(HostileSuite):
    """The attacks every runtime withstands, on an SSH host (no limits of its own: the bombs
    stay bounded by their own counts)."""

    @pytest.fixture
    def hostile(self, ssh_host: dict[str, str]) -> HostileRuntime:
        user = pwd.getpwnam(USER)
        return HostileRuntime(kernel_name="sandbox-ssh", sandbox_exists=lambda kid: bool(kernel_dirs(kid)),
                              start_timeout=120, exec_timeout=120, process_limit=False, memory_limit=False,
                              flood_bytes=128 * MiB, canary_owner=(user.pw_uid, user.pw_gid))
