"""A JupyterHub single-user server with sandbox kernels, as jupyter-config/jupyterhub spawns one.

The server runs as a non-root user in the ``docker`` group with the environment that
``jupyterhub_config.py`` gives it (the admin's level of trust), from this project's environment.
Through its REST API and kernel websocket a Docker kernel starts, runs code as that user, and
has snapshots; code in the kernel cannot reach the server's control socket; a kernelspec in the
user's own Jupyter directory cannot widen what the hub's environment allows.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import secrets
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPClientError
from tornado.websocket import websocket_connect
from traitlets.config import Config

from helpers.ssh_host import ensure_user
from helpers.wheel_env import WheelVenv, run, wheel_venv  # noqa: F401 (fixture)

pytestmark = pytest.mark.docker

REPO = Path(__file__).resolve().parent.parent
USER = "sk-hub"


def hub_environment() -> dict[str, str]:
    """``c.Spawner.environment`` from the example hub config."""
    config = Config()
    namespace = {"get_config": lambda: config}
    exec(compile((REPO / "jupyter-config/jupyterhub/jupyterhub_config.py").read_text(),
                 "jupyterhub_config.py", "exec"), namespace)
    return dict(config.Spawner.environment)


def _ensure_user() -> pwd.struct_passwd:
    """The hub's user, in the docker group (as the example's comment asks)."""
    ensure_user(USER)
    subprocess.run(["usermod", "-aG", "docker", USER], check=True)
    return pwd.getpwnam(USER)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def single_user_server(wheel_venv: WheelVenv) -> Iterator[dict[str, Any]]:
    """``jupyter server`` as the hub would spawn it, from the installed wheel (the hub admin's
    install, see jupyterhub_config.py); yields its URL, token and user."""
    if os.geteuid() != 0:
        pytest.fail("needs root to add the test user (CI runs as root)")
    user = _ensure_user()
    port, token = _free_port(), secrets.token_hex(16)
    home = Path(user.pw_dir)
    bindir = wheel_venv.venv / "bin"
    run([str(bindir / "sandbox-kernels"), "install-kernelspecs", "--sys-prefix"], {"PATH": f"{bindir}:/usr/bin:/bin"})
    env = {
        "PATH": f"{bindir}:/usr/bin:/bin", "HOME": str(home), "USER": USER,
        "SANDBOX_KERNELS_SESSION": os.environ["SANDBOX_KERNELS_SESSION"],  # the leak check's label
        **hub_environment(),
    }
    log = open(home / "server.log", "wb")
    proc = subprocess.Popen(
        ["/usr/sbin/runuser", "-u", USER, "--", str(bindir / "jupyter"), "server",
         "--no-browser", f"--port={port}", "--ip=127.0.0.1", f"--IdentityProvider.token={token}",
         f"--ServerApp.root_dir={home}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=home)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (home / "server.log").read_text()[-3000:]
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the single-user server did not listen"
                time.sleep(0.2)
        yield {"url": url, "token": token, "uid": user.pw_uid, "home": home}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
        log.close()


async def _api(server: dict[str, Any], path: str, method: str = "GET", body: Any = None) -> Any:
    response = await AsyncHTTPClient().fetch(
        f"{server['url']}{path}", method=method, request_timeout=300,
        headers={"Authorization": f"token {server['token']}"},
        body=json.dumps(body or {}) if method in ("POST", "PUT", "PATCH") else None)
    return json.loads(response.body) if response.body else None


async def _execute(server: dict[str, Any], kernel_id: str, code: str, timeout: float = 120) -> str:
    """Run ``code`` over the kernel websocket, as JupyterLab does; return its stdout."""
    ws = await websocket_connect(
        f"ws://{server['url'].removeprefix('http://')}/api/kernels/{kernel_id}/channels?token={server['token']}")
    msg_id = uuid.uuid4().hex
    ws.write_message(json.dumps({
        "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": USER,
                   "session": uuid.uuid4().hex, "version": "5.3", "date": ""},
        "parent_header": {}, "metadata": {}, "channel": "shell",
        "content": {"code": code, "silent": False, "store_history": False,
                    "user_expressions": {}, "allow_stdin": False}}))
    out = ""
    replied = idle = False
    deadline = time.monotonic() + timeout
    try:
        # Done when the shell reply and the iopub "idle" of this request have both come: the
        # channels are separate sockets, so the reply may overtake the output.
        while not (replied and idle):
            raw = await asyncio.wait_for(ws.read_message(), max(1.0, deadline - time.monotonic()))
            assert raw is not None, "the kernel websocket closed"
            msg = json.loads(raw)
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                out += msg["content"]["text"]
            elif msg["msg_type"] == "error":
                out += f"{msg['content']['ename']}: {msg['content']['evalue']}"
            elif msg["msg_type"] == "execute_reply":
                replied = True
            elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                idle = True
        return out
    finally:
        ws.close()


async def test_single_user_server_runs_sandbox_kernels(single_user_server: dict[str, Any]) -> None:
    server = single_user_server
    runtimes = await _api(server, "/sandbox-kernels/api/runtimes")
    assert any(r["kernel_name"] == "sandbox-docker" and r["ok"] for r in runtimes), runtimes
    kernel = await _api(server, "/api/kernels", "POST", {"name": "sandbox-docker"})
    kid = kernel["id"]
    try:
        out = await _execute(server, kid, "import os; print(os.getuid())")
        assert out.strip() == str(server["uid"]), f"the kernel should run as the hub user: {out!r}"
        snaps = await _api(server, f"/sandbox-kernels/api/kernels/{kid}/snapshots")
        assert snaps["kinds"] == ["filesystem"], snaps
        # The finding this guards against: as a non-root server the container ran as the
        # server's uid and could drive the control socket (snapshots without authentication).
        probe = await _execute(server, kid, (
            "import glob, os, socket\n"
            "hits = []\n"
            "for path in glob.glob('/tmp/**/control.sock', recursive=True) + glob.glob('/run/**/control.sock', recursive=True):\n"
            "    s = socket.socket(socket.AF_UNIX)\n"
            "    try:\n"
            "        s.connect(path); s.sendall(b'{\"op\": \"list\"}\\n'); hits.append((path, s.recv(100)))\n"
            "    except OSError:\n"
            "        pass\n"
            "print(hits)"))
        assert probe.strip() == "[]", probe
    finally:
        await _api(server, f"/api/kernels/{kid}", "DELETE")


async def test_users_kernelspec_cannot_widen_the_hubs_settings(single_user_server: dict[str, Any]) -> None:
    server = single_user_server
    kernels = server["home"] / ".local/share/jupyter/kernels/wide"
    spec = json.loads((REPO / "kernelspecs/sandbox-docker/kernel.json").read_text())
    spec["metadata"]["kernel_provisioner"]["config"] = {"memory": "1g", "snapshot_max_count": 1000}
    kernels.mkdir(parents=True, exist_ok=True)
    (kernels / "kernel.json").write_text(json.dumps(spec))
    subprocess.run(["chown", "-R", f"{USER}:{USER}", str(server["home"] / ".local")], check=True)
    with pytest.raises(HTTPClientError) as info:
        await _api(server, "/api/kernels", "POST", {"name": "wide"})
    assert info.value.code == 500
    listing = await _api(server, "/api/kernels")
    assert listing == [], "a refused start must leave no kernel behind"
    log = (server["home"] / "server.log").read_text()
    assert "kernelspec setting snapshot_max_count=1000 widens" in log, log[-3000:]
    assert "SANDBOX_KERNELS_SNAPSHOT_MAX_COUNT" in log
