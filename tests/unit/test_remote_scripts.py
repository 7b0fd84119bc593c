"""The shared shell scripts (:mod:`sandbox_kernels.remote.scripts`) run by a local ``sh``: the
same texts both shells (SSH exec, Kubernetes exec) run in sandboxes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from sandbox_kernels.errors import SandboxConfigError
from sandbox_kernels.remote import scripts

pytestmark = pytest.mark.skipif(shutil.which("setsid") is None, reason="needs setsid (util-linux)")


def sh(script: str, *args: str, stdin: bytes = b"", timeout: float = 20) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["sh", "-c", script, "test", *args], input=stdin, capture_output=True,
                          timeout=timeout, check=False)


def launch(tmp_path: Path, argv: list[str], env: dict[str, str]) -> int:
    data = scripts.env_file(env)
    log = tmp_path / "k.log"
    result = sh(scripts.LAUNCH_ENV_STDIN, "", str(log), scripts.WRAPPER_ENV_FILE, str(len(data)), *argv,
                stdin=data)
    assert result.returncode == 0, result.stderr
    return int(result.stdout)


def wait_for(path: Path, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def test_environment_values_reach_the_process_byte_for_byte(tmp_path: Path) -> None:
    tricky = "a'b\"c $(touch pwned) `id` ; \\n \u00e9"
    pid = launch(tmp_path, ["sh", "-c", 'printf %s "$TRICKY"'], {"TRICKY": tricky})
    wait_for(tmp_path / "k.log.exit")
    assert (tmp_path / "k.log").read_text() == tricky
    assert not (tmp_path / "k.log.env").exists() and not Path("pwned").exists()
    status = sh(scripts.STATUS, str(pid), str(tmp_path / "k.log.exit")).stdout.split()
    assert status == [b"exited", b"0"]


def test_argv_launch_status_and_signal(tmp_path: Path) -> None:
    """(Only pids > 1 are ever signalled: the launcher's pid is checked first.)"""
    words = scripts.env_words({"X": "1"})
    log = tmp_path / "k.log"
    result = sh(scripts.LAUNCH_ARGV, "", str(log), scripts.WRAPPER_ARGV, str(len(words)), *words,
                "sh", "-c", 'echo "$X"; exec sleep 30')
    pid = int(result.stdout)
    assert pid > 1
    try:
        assert sh(scripts.STATUS, str(pid), f"{log}.exit").stdout == b"running\n"
        deadline = time.monotonic() + 10
        while not log.read_text() and time.monotonic() < deadline:  # the child has its environment
            time.sleep(0.05)
        assert sh(scripts.SIGNAL, "TERM", str(pid)).returncode == 0
        wait_for(Path(f"{log}.exit"))
        assert sh(scripts.STATUS, str(pid), f"{log}.exit").stdout.split()[0] == b"exited"
        assert log.read_text().startswith("1\n")
        assert sh(scripts.SIGNAL, "TERM", str(pid)).returncode == 3  # no such process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)  # never /bin/kill: procps reads "-<pid>" as "-1", everything


def test_gone_process_without_status() -> None:
    assert sh(scripts.STATUS, "999999999", "/nonexistent").stdout == b"gone\n"


def test_wait_ports_prints_the_file_once_written_and_exits_3_when_the_kernel_dies(tmp_path: Path) -> None:
    conn = tmp_path / "connection.json"
    conn.write_text(json.dumps({"shell_port": 0, "hb_port": 0}))
    proc = subprocess.Popen(["sleep", "30"])
    try:
        conn.write_text(json.dumps({"shell_port": 5, "hb_port": 6}))
        result = sh(scripts.WAIT_PORTS, str(conn), str(proc.pid), "100")
        assert result.returncode == 0 and json.loads(result.stdout)["hb_port"] == 6
        assert sh(scripts.WAIT_PORTS, str(conn), str(proc.pid), "10").stdout == conn.read_bytes()[:10]
    finally:
        proc.kill()
        proc.wait()
    conn.write_text(json.dumps({"shell_port": 0, "hb_port": 0}))
    assert sh(scripts.WAIT_PORTS, str(conn), str(proc.pid), "100").returncode == 3


def test_sized_write_takes_exactly_its_bytes(tmp_path: Path) -> None:
    target = tmp_path / "f"
    result = sh(scripts.WRITE_SIZED, str(target), "640", "3", stdin=b"abcdef")
    assert result.returncode == 0 and target.read_bytes() == b"abc"
    assert oct(os.stat(target).st_mode & 0o777) == "0o640"
    assert sh(scripts.WRITE_SIZED, str(target), "600", "9", stdin=b"abc").returncode != 0
    assert target.read_bytes() == b"abc" and [p.name for p in tmp_path.iterdir()] == ["f"]


def test_tail_is_bounded(tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.write_bytes(b"x" * 100000)
    assert len(sh(scripts.TAIL, "30", str(log), "1000").stdout) == 1000


@pytest.mark.parametrize("env", [{"1X": "v"}, {"A-B": "v"}, {"A": "v\0"}, {"A": 1}])
def test_bad_environment_is_refused(env: dict[str, str]) -> None:
    with pytest.raises(SandboxConfigError):
        scripts.env_file(env)
    with pytest.raises(SandboxConfigError):
        scripts.env_words(env)
