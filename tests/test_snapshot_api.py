"""The snapshot REST API against a real Jupyter server and real sandbox kernels."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tornado.httpclient import HTTPClientError

from helpers.kernels import run_cell
from helpers.orphans import docker_containers, start_orphan
from helpers.server_api import api, api_status, extension_config, start_server_kernel

VENV_BIN = Path(sys.executable).parent


@pytest.fixture
def orphan_kernel() -> str:
    """A Docker kernel whose owning process was SIGKILLed (what a crashed server leaves)."""
    kernel_id = start_orphan("sandbox-docker")
    assert docker_containers(kernel_id)
    return kernel_id


@pytest.fixture
def jp_server_config() -> dict[str, Any]:
    return extension_config()


async def test_docker_filesystem_round_trip(jp_fetch: Any, jp_serverapp: Any) -> None:
    kid, kc = await start_server_kernel(jp_fetch, jp_serverapp, "sandbox-docker")
    try:
        await run_cell(kc, "x = 1\nopen('before.txt', 'w').write('kept')")
        snap = await api(jp_fetch, "kernels", kid, "snapshots", method="POST", body={"name": "s1"})
        assert snap["name"] == "s1" and snap["kind"] == "filesystem" and snap["size"] > 0
        await run_cell(kc, "y = 2\nopen('after.txt', 'w').write('gone')")
        listing = await api(jp_fetch, "kernels", kid, "snapshots")
        assert [s["name"] for s in listing["snapshots"]] == ["s1"]
        assert listing["kinds"] == ["filesystem"] and "memory" in listing["note"]
        result = await api(jp_fetch, "kernels", kid, "snapshots", "s1", "rollback", method="POST")
        assert result["kernel_restarted"] is True
        model = json.loads((await jp_fetch("api", "kernels", kid)).body)
        assert model["execution_state"] == "idle", "the server must not show the restarted kernel as starting"
        await kc.wait_for_ready(timeout=60)
        out = await run_cell(kc, "import os\nprint(os.path.exists('before.txt'), os.path.exists('after.txt'), 'y' in globals())")
        assert out["stdout"] == "True False False\n", out
        code, msg = await api_status(jp_fetch, "kernels", kid, "snapshots", "s1", method="DELETE")
        assert code == 400 and "currently runs from" in msg
        await api(jp_fetch, "kernels", kid, "snapshots", method="POST", body={"name": "s2"})
        await api(jp_fetch, "kernels", kid, "snapshots", "s2", method="DELETE")
        listing = await api(jp_fetch, "kernels", kid, "snapshots")
        assert [s["name"] for s in listing["snapshots"]] == ["s1"]
    finally:
        kc.stop_channels()
        await jp_fetch("api", "kernels", kid, method="DELETE")
    images = subprocess.run(["docker", "images", "-q", "--filter", f"label=sandbox-kernels.kernel-id={kid}"],
                            capture_output=True, text=True, check=True).stdout.split()
    assert not images, "snapshots of a deleted kernel must be removed"


async def _login_cookies(jp_fetch: Any, jp_serverapp: Any) -> str:
    """Log in as a browser does (token in the URL once) and return the session cookies."""
    token = jp_serverapp.identity_provider.token
    r = await jp_fetch("tree", params={"token": token}, headers={"Authorization": ""}, follow_redirects=False,
                       raise_error=False)
    cookies = [c.split(";", 1)[0] for c in r.headers.get_list("Set-Cookie")]
    assert any(c.startswith("username-") for c in cookies), r.headers
    return "; ".join(cookies)


@pytest.mark.docker
async def test_bad_requests(jp_fetch: Any, jp_serverapp: Any) -> None:
    assert (await api_status(jp_fetch, "kernels", "nope", "snapshots"))[0] == 404
    kid, kc = await start_server_kernel(jp_fetch, jp_serverapp, "sandbox-docker")
    try:
        for bad in ["../etc", "a b", "<x/>", "x" * 200, "$(reboot)", ".hidden", "a;b"]:
            code, msg = await api_status(jp_fetch, "kernels", kid, "snapshots", method="POST", body={"name": bad})
            assert code == 400 and "snapshot name" in msg, (bad, code, msg)
        assert (await api_status(jp_fetch, "kernels", kid, "snapshots", method="POST", body="{not json"))[0] == 400
        assert (await api_status(jp_fetch, "kernels", kid, "snapshots", method="POST", body="[1]"))[0] == 400
        assert (await api_status(jp_fetch, "kernels", kid, "snapshots", method="POST", body={"name": 5}))[0] == 400
        assert (await api_status(jp_fetch, "kernels", kid, "snapshots", method="POST",
                              body={"kind": "memory"}))[0] == 400
        code, _ = await api_status(jp_fetch, "kernels", kid, "snapshots", method="POST",
                                body=json.dumps({"name": "x" * 20000}))
        assert code == 413
        assert (await api_status(jp_fetch, "kernels", kid, "snapshots", "missing", "rollback", method="POST"))[0] == 404
        assert (await api_status(jp_fetch, "kernels", kid, "snapshots", "missing", method="DELETE"))[0] == 404
        # A page on another origin riding on the user's login cookie is refused before anything runs.
        cookies = await _login_cookies(jp_fetch, jp_serverapp)
        ok = await jp_fetch("sandbox-kernels", "api", "kernels", kid, "snapshots",
                            headers={"Authorization": "", "Cookie": cookies})
        assert ok.code == 200, "the login cookie alone authenticates a same-origin read"
        for headers in ({"Origin": "http://evil.example", "Cookie": cookies},  # cross-origin
                        {"Cookie": cookies}):  # same origin but no XSRF token
            with pytest.raises(HTTPClientError) as info:
                await jp_fetch("sandbox-kernels", "api", "kernels", kid, "snapshots", method="POST",
                               body=json.dumps({"name": "evil"}), headers={"Authorization": "", **headers})
            assert info.value.code in (403, 404), headers
        assert (await api(jp_fetch, "kernels", kid, "snapshots"))["snapshots"] == []
    finally:
        kc.stop_channels()
        await jp_fetch("api", "kernels", kid, method="DELETE")


async def test_non_sandbox_kernel_is_409(jp_fetch: Any, jp_serverapp: Any) -> None:
    r = await jp_fetch("api", "kernels", method="POST", body=json.dumps({"name": "python3"}))
    kid = json.loads(r.body)["id"]
    try:
        code, msg = await api_status(jp_fetch, "kernels", kid, "snapshots")
        assert code == 409 and "not started by a sandbox provisioner" in msg
    finally:
        await jp_fetch("api", "kernels", kid, method="DELETE")


async def test_unauthenticated_requests_refused(jp_fetch: Any, jp_serverapp: Any) -> None:
    routes = [("GET", ["runtimes"], None), ("POST", ["kernels", "k", "snapshots"], "{}"),
              ("POST", ["kernels", "k", "snapshots", "a", "rollback"], "{}"),
              ("DELETE", ["kernels", "k", "snapshots", "a"], None)]
    for method, parts, body in routes:
        with pytest.raises(HTTPClientError) as info:
            await jp_fetch("sandbox-kernels", "api", *parts, method=method, body=body,
                           headers={"Authorization": ""})
        assert info.value.code in (401, 403), (parts, info.value.code)



async def test_runtimes_report(jp_fetch: Any) -> None:
    reports = await api(jp_fetch, "runtimes")
    by_name = {r["runtime"]: r for r in reports}
    assert set(by_name) >= {"docker", "libvirt", "k8s", "ssh"}
    assert by_name["docker"]["ok"] is True


@pytest.mark.docker
def test_cli_snapshot_on_a_papermill_style_kernel(jp_asyncio_loop: Any) -> None:
    """The CLI reaches a kernel owned by a process without a server, via its control socket."""
    from helpers.kernels import start

    km, kc = jp_asyncio_loop.run_until_complete(start("sandbox-docker", timeout=60))
    cli = [str(VENV_BIN / "sandbox-kernels"), "snapshot"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        # The CLI blocks while the owner's loop must serve it: run the loop meanwhile.
        import asyncio

        async def go() -> subprocess.CompletedProcess[str]:
            proc = await asyncio.create_subprocess_exec(*cli, *args, stdout=subprocess.PIPE,
                                                        stderr=subprocess.PIPE)
            out, err = await proc.communicate()
            return subprocess.CompletedProcess(args, proc.returncode or 0, out.decode(), err.decode())

        return jp_asyncio_loop.run_until_complete(go())

    try:
        created = run("create", km.kernel_id, "cli1")
        assert created.returncode == 0, created.stderr
        listed = run("list", km.kernel_id)
        assert "cli1" in listed.stdout and "filesystem" in listed.stdout
        bad = run("create", km.kernel_id, "../x")
        assert bad.returncode == 2 and "snapshot name" in bad.stderr
        missing = run("list", "0000-not-running")
        assert missing.returncode == 2 and "no running sandbox kernel" in missing.stderr
        assert run("delete", km.kernel_id, "cli1").returncode == 0
    finally:
        kc.stop_channels()
        jp_asyncio_loop.run_until_complete(km.shutdown_kernel(now=True))


@pytest.mark.vm
async def test_vm_memory_and_disk_round_trips(jp_fetch: Any, jp_serverapp: Any) -> None:
    """x = 1, snapshot, y = 2 and a file, roll back: x is back, y and the file are gone.

    Then a disk snapshot and its rollback (kernel restarted, files back), and the memory
    snapshot again after that.
    """
    kid, kc = await start_server_kernel(jp_fetch, jp_serverapp, "sandbox-nixos-vm")
    try:
        await run_cell(kc, "x = 1", timeout=240)
        snap = await api(jp_fetch, "kernels", kid, "snapshots", method="POST", body={"name": "before"})
        assert snap["kind"] == "memory"
        await run_cell(kc, "y = 2\nopen('after.txt', 'w').write('gone')", timeout=240)
        result = await api(jp_fetch, "kernels", kid, "snapshots", "before", "rollback", method="POST")
        assert result["kernel_restarted"] is False
        out = await run_cell(kc, "import os\nprint('x' in globals(), 'y' in globals(), os.path.exists('after.txt'))",
                             timeout=240)
        assert out["stdout"] == "True False False\n", out
        model = json.loads((await jp_fetch("api", "kernels", kid)).body)
        assert model["id"] == kid and model["execution_state"] != "dead"

        # Disk only: cheaper; the rollback boots the VM again and restarts the kernel.
        await run_cell(kc, "open('kept.txt', 'w').write('k')", timeout=240)
        snap = await api(jp_fetch, "kernels", kid, "snapshots", method="POST", body={"name": "d1", "kind": "disk"})
        assert snap["kind"] == "disk"
        await run_cell(kc, "z = 3\nopen('z.txt', 'w').write('z')", timeout=240)
        result = await api(jp_fetch, "kernels", kid, "snapshots", "d1", "rollback", method="POST")
        assert result["kernel_restarted"] is True and result["kind"] == "disk"
        model = json.loads((await jp_fetch("api", "kernels", kid)).body)
        assert model["execution_state"] == "idle"
        await kc.wait_for_ready(timeout=240)
        out = await run_cell(kc, "import os\nprint('x' in globals(), os.path.exists('kept.txt'), os.path.exists('z.txt'))",
                             timeout=240)
        assert out["stdout"] == "False True False\n", out
        listing = await api(jp_fetch, "kernels", kid, "snapshots")
        assert [(s["name"], s["kind"]) for s in listing["snapshots"]] == [("before", "memory"), ("d1", "disk")]
        assert listing["kinds"] == ["memory", "disk"]

        # The memory snapshot taken before the disk rollback still returns to its moment.
        result = await api(jp_fetch, "kernels", kid, "snapshots", "before", "rollback", method="POST")
        assert result["kernel_restarted"] is False
        out = await run_cell(kc, "import os\nprint('x' in globals(), os.path.exists('kept.txt'))", timeout=240)
        assert out["stdout"] == "True False\n", out
        await api(jp_fetch, "kernels", kid, "snapshots", "d1", method="DELETE")
        listing = await api(jp_fetch, "kernels", kid, "snapshots")
        assert [s["name"] for s in listing["snapshots"]] == ["before"]
    finally:
        kc.stop_channels()
        await jp_fetch("api", "kernels", kid, method="DELETE", request_timeout=120)


@pytest.mark.docker
async def test_server_start_reaps_a_dead_servers_sandboxes(orphan_kernel: str, jp_serverapp: Any) -> None:
    """The extension removes, in the background, what a killed server of this host left."""
    import asyncio
    import os
    import time

    state = Path(os.environ["SANDBOX_KERNELS_STATE_DIR"]) / orphan_kernel
    deadline = time.monotonic() + 60
    while (docker_containers(orphan_kernel) or state.exists()) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    assert not docker_containers(orphan_kernel), "the orphaned container must be reaped at server start"
    assert not state.exists(), "and its state directory"
