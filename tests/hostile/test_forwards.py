"""Another local user attacks a forwarded kernel's client-side sockets (issue 10, finding 6).

The SSH-host runtime is the cheapest real forward (the VM and Kubernetes runtimes share the
same listeners, :mod:`sandbox_kernels.client_sockets`). A process running as ``nobody``
tries to connect to each of the kernel's five endpoints and to subscribe to iopub while the
kernel prints a secret. With the default ``transport="ipc"`` every connection is refused
(EACCES: the sockets sit in the kernel's 0700 state directory) and nothing is read; with
``transport="tcp"`` (what every forward used before) the same attacker connects and reads
the secret, which is why TCP is an admin's opt-in.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from helpers.ssh_host import ssh_host as running_ssh_host
from lifecycle import run_cell, start

pytestmark = [pytest.mark.hostile, pytest.mark.ssh]

CHANNELS = ("shell", "iopub", "stdin", "control", "hb")
SECRET = "sandbox-kernels-secret-7f3a"

#: Runs as ``nobody``: connect to every endpoint, subscribe to iopub, then report (one JSON
#: line) the errno of each connection and whatever iopub delivered within the window.
ATTACK = r"""
import errno, json, socket, sys, time, zmq
info = json.loads(sys.argv[1])
result = {"connect": {}, "iopub": []}
for ch in ("shell", "iopub", "stdin", "control", "hb"):
    port = info[ch + "_port"]
    if info["transport"] == "ipc":
        sock, addr = socket.socket(socket.AF_UNIX), "%s-%d" % (info["ip"], port)
    else:
        sock, addr = socket.socket(), (info["ip"], port)
    try:
        sock.connect(addr)
        result["connect"][ch] = "connected"
    except OSError as e:
        result["connect"][ch] = errno.errorcode.get(e.errno, str(e.errno))
    finally:
        sock.close()
ctx = zmq.Context()
sub = ctx.socket(zmq.SUB)
sub.setsockopt(zmq.SUBSCRIBE, b"")
sub.connect("%s://%s%s%d" % (info["transport"], info["ip"], "-" if info["transport"] == "ipc" else ":",
                             info["iopub_port"]))
print("ready", flush=True)
deadline = time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline and len(result["iopub"]) < 200:
    if sub.poll(200):
        result["iopub"].append(b"".join(sub.recv_multipart()).decode(errors="replace"))
        if any(SECRET in m for m in result["iopub"]):
            break
print(json.dumps(result), flush=True)
""".replace("SECRET", repr(SECRET))


@pytest.fixture(scope="module")
def ssh_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    if os.geteuid() != 0:
        pytest.skip("needs root to add the test user and run sshd as it")
    with running_ssh_host(tmp_path_factory.mktemp("sshd"), tag="fwd") as env:
        yield env


@pytest.fixture
def transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The admin's choice (the server's environment): a kernelspec may not widen ipc to tcp."""
    monkeypatch.setenv("SANDBOX_KERNELS_TRANSPORT", request.param)
    return str(request.param)


@pytest.fixture
def kernel(ssh_host: dict[str, str], transport: str, jp_asyncio_loop: Any) -> Iterator[Any]:
    km, kc = jp_asyncio_loop.run_until_complete(start("sandbox-ssh", timeout=120))
    try:
        yield km, kc
    finally:
        kc.stop_channels()
        if km.has_kernel:
            jp_asyncio_loop.run_until_complete(km.shutdown_kernel(now=True))


def _attack_as_nobody(info: dict[str, Any], window: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, "-c", ATTACK,
         json.dumps(info), str(window)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")


@pytest.mark.parametrize("transport", ["ipc", "tcp"], indirect=True)
async def test_another_user_cannot_reach_the_kernel(kernel: Any, transport: str) -> None:
    km, kc = kernel
    info = json.loads(Path(km.connection_file).read_text())
    assert info["transport"] == transport
    if transport == "ipc":
        state_dir = Path(info["ip"]).parent
        assert stat.S_IMODE(os.lstat(state_dir).st_mode) == 0o700
        for ch in CHANNELS:
            st = os.lstat(f"{info['ip']}-{info[f'{ch}_port']}")
            assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600, ch
            assert st.st_uid == os.geteuid()
    attacker = _attack_as_nobody(info, window=20)
    try:
        assert attacker.stdout is not None
        ready = await asyncio.to_thread(attacker.stdout.readline)
        assert ready.strip() == "ready", attacker.stderr.read() if attacker.stderr else ""
        # The owner keeps using the kernel while the attacker listens.
        for _ in range(3):
            out = await run_cell(kc, f"print({SECRET!r})", timeout=60)
            assert out["stdout"] == f"{SECRET}\n"
        result = json.loads(await asyncio.to_thread(attacker.stdout.readline))
    finally:
        attacker.kill()
        attacker.wait(30)
    leaked = [m for m in result["iopub"] if SECRET in m]
    if transport == "ipc":
        assert result["connect"] == {ch: "EACCES" for ch in CHANNELS}
        assert result["iopub"] == []
    else:  # what every forward did before: any local user reads the kernel's output
        assert result["connect"] == {ch: "connected" for ch in CHANNELS}
        assert leaked, result


@pytest.mark.parametrize("transport", ["ipc"], indirect=True)
async def test_restart_keeps_the_sockets_private_and_reachable(kernel: Any, transport: str) -> None:
    """A restart (jupyter_client removes the ipc names) keeps the same endpoints, still 0600,
    and the connected client goes on; shutdown removes them."""
    km, kc = kernel
    info = json.loads(Path(km.connection_file).read_text())
    paths = [Path(f"{info['ip']}-{info[f'{ch}_port']}") for ch in CHANNELS]
    before = {p: os.lstat(p).st_ino for p in paths}
    await km.restart_kernel(now=True)
    await kc.wait_for_ready(timeout=120)
    out = await run_cell(kc, "print('after restart')", timeout=60)
    assert out["stdout"] == "after restart\n"
    for p in paths:
        st = os.lstat(p)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_ino == before[p], f"{p} is a new socket: clients would have been cut off"
    kc.stop_channels()
    await km.shutdown_kernel(now=True)
    assert [p for p in paths if os.path.lexists(p)] == []
    assert not Path(info["ip"]).parent.exists()


@pytest.mark.parametrize("transport", ["ipc"], indirect=True)
async def test_jupyter_server_reaches_an_ipc_kernel(ssh_host: dict[str, str], transport: str,
                                                    jp_fetch: Any, jp_ws_fetch: Any, jp_serverapp: Any) -> None:
    """What JupyterLab does: start the kernel through the REST API and run code over the
    server's websocket, which talks to the kernel through the ipc sockets."""
    r = await jp_fetch("api", "kernels", method="POST", body=json.dumps({"name": "sandbox-ssh"}),
                       request_timeout=300)
    kernel_id = json.loads(r.body)["id"]
    try:
        assert jp_serverapp.kernel_manager.get_kernel(kernel_id).transport == "ipc"
        ws = await jp_ws_fetch("api", "kernels", kernel_id, "channels")
        msg_id = uuid.uuid4().hex
        ws.write_message(json.dumps({
            "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "", "session": "s",
                       "date": "", "version": "5.3"},
            "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
            "content": {"code": f"print({SECRET!r})", "silent": False, "store_history": False,
                        "user_expressions": {}, "allow_stdin": False, "stop_on_error": True},
        }))
        text = ""
        for _ in range(200):
            msg = json.loads(await asyncio.wait_for(ws.read_message(), timeout=120))
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                text += msg["content"]["text"]
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
        ws.close()
        assert text == f"{SECRET}\n"
    finally:
        await jp_fetch("api", "kernels", kernel_id, method="DELETE", request_timeout=120)
