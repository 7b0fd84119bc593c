"""Faults and clean-up: a killed owner's sandboxes are reaped; bad input is refused early."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.orphans import docker_containers, start_orphan
from sandbox_kernels.errors import SandboxUnavailable

VENV_BIN = Path(sys.executable).parent


@pytest.mark.docker
def test_killed_owner_is_reaped(tmp_path: Path) -> None:
    """SIGKILL the process that owns a kernel (no clean-up runs); reap finds and removes it."""
    kernel_id = start_orphan("sandbox-docker")
    state = Path(os.environ["SANDBOX_KERNELS_STATE_DIR"]) / kernel_id
    assert state.exists() and docker_containers(kernel_id), "a killed owner cannot clean up"

    reap = [str(VENV_BIN / "sandbox-kernels"), "reap", "--min-age", "0"]
    dry = subprocess.run(reap, capture_output=True, text=True, check=True)
    assert f"sandbox-kernels-{kernel_id}" in dry.stdout and "dry run" in dry.stdout
    assert docker_containers(kernel_id), "a dry run removes nothing"
    real = subprocess.run([*reap, "--yes"], capture_output=True, text=True, check=True)
    assert "removed container" in real.stdout
    assert not docker_containers(kernel_id)
    assert not state.exists(), real.stdout


@pytest.mark.docker
def test_reap_leaves_live_kernels_alone(jp_asyncio_loop: object) -> None:
    from helpers.kernels import start

    km, kc = jp_asyncio_loop.run_until_complete(start("sandbox-docker", timeout=60))  # type: ignore[attr-defined]
    try:
        out = subprocess.run([str(VENV_BIN / "sandbox-kernels"), "reap", "--yes"],
                             capture_output=True, text=True, check=True)
        assert km.kernel_id not in out.stdout
        assert docker_containers(km.kernel_id)
    finally:
        kc.stop_channels()
        jp_asyncio_loop.run_until_complete(km.shutdown_kernel(now=True))  # type: ignore[attr-defined]


@pytest.mark.docker
def test_docker_engine_down_message(monkeypatch: pytest.MonkeyPatch, jp_asyncio_loop: object) -> None:
    """With no engine at DOCKER_HOST the start fails with what to do, and nothing is left."""
    from jupyter_client.manager import AsyncKernelManager

    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    km = AsyncKernelManager(kernel_name="sandbox-docker")
    with pytest.raises(SandboxUnavailable) as info:
        jp_asyncio_loop.run_until_complete(km.start_kernel())  # type: ignore[attr-defined]
    assert "Docker engine is not reachable" in str(info.value) and "dockerd" in str(info.value)
    assert not (Path(os.environ["SANDBOX_KERNELS_STATE_DIR"]) / km.kernel_id).exists()


@pytest.mark.docker
def test_env_values_are_data_not_shell(kernelspec_dir: object, jp_asyncio_loop: object) -> None:
    """Kernelspec env values with shell metacharacters reach the kernel literally."""
    import json

    from jupyter_client.kernelspec import KernelSpecManager

    from helpers.kernels import run_cell, start

    kdir = kernelspec_dir("sandbox-docker", name="envy")  # type: ignore[operator]
    spec_path = Path(kdir) / "envy" / "kernel.json"
    spec = json.loads(spec_path.read_text())
    # ($NAME of a set variable would be filled in by jupyter_client's documented kernelspec
    # env templating, which is data substitution, not a shell.)
    hostile = "$(touch /tmp/pwned); `id`; echo $SK_UNSET_VARIABLE | cat > /tmp/pwned"
    spec["env"] = {"HOSTILE": hostile}
    spec_path.write_text(json.dumps(spec))
    ksm = KernelSpecManager(kernel_dirs=[str(kdir)])
    km, kc = jp_asyncio_loop.run_until_complete(start("envy", ksm=ksm, timeout=60))  # type: ignore[attr-defined]
    try:
        out = jp_asyncio_loop.run_until_complete(  # type: ignore[attr-defined]
            run_cell(kc, "import os; print(os.environ['HOSTILE']); print(os.path.exists('/tmp/pwned'))"))
        assert out["stdout"] == f"{hostile}\nFalse\n"
        leaked = jp_asyncio_loop.run_until_complete(  # type: ignore[attr-defined]
            run_cell(kc, "import os; print(sorted(k for k in os.environ if k.startswith('SANDBOX_KERNELS')))"))
        assert leaked["stdout"] == "[]\n", "host environment must not leak into the sandbox"
    finally:
        kc.stop_channels()
        jp_asyncio_loop.run_until_complete(km.shutdown_kernel(now=True))  # type: ignore[attr-defined]
    assert not os.path.exists("/tmp/pwned")


@pytest.mark.docker
def test_hmac_key_differs_per_kernel_and_is_not_logged(jp_asyncio_loop: object) -> None:
    import io
    import logging

    from helpers.kernels import start

    text = io.StringIO()
    handler = logging.StreamHandler(text)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    keys = []
    try:
        for _ in range(2):
            km, kc = jp_asyncio_loop.run_until_complete(start("sandbox-docker", timeout=60))  # type: ignore[attr-defined]
            km.log.setLevel(logging.DEBUG)
            keys.append(km.session.key.decode())
            kc.stop_channels()
            jp_asyncio_loop.run_until_complete(km.shutdown_kernel(now=True))  # type: ignore[attr-defined]
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    assert keys[0] != keys[1]
    assert text.getvalue(), "nothing was logged: the check below would prove nothing"
    assert not any(k in text.getvalue() for k in keys)


@pytest.mark.docker
def test_fork_bomb_and_memory_hog_are_contained(kernelspec_dir: object, jp_asyncio_loop: object) -> None:
    """pids and memory limits hold: a fork loop hits the pids limit, a hog is OOM-killed and detected."""
    from jupyter_client.kernelspec import KernelSpecManager

    from helpers.kernels import run_cell, start, wait_until

    kdir = kernelspec_dir("sandbox-docker", name="small", memory="256m", pids_limit=64)  # type: ignore[operator]
    ksm = KernelSpecManager(kernel_dirs=[str(kdir)])
    loop = jp_asyncio_loop
    km, kc = loop.run_until_complete(start("small", ksm=ksm, timeout=60))  # type: ignore[attr-defined]
    try:
        forks = loop.run_until_complete(run_cell(kc, (  # type: ignore[attr-defined]
            "import os, time\nchildren, error = [], None\n"
            "for _ in range(500):\n"
            "    try:\n        pid = os.fork()\n"
            "    except OSError as e:\n        error = e.errno; break\n"
            "    if pid == 0:\n        time.sleep(30); os._exit(0)\n"
            "    children.append(pid)\n"
            "for pid in children:\n    os.kill(pid, 9); os.waitpid(pid, 0)\n"
            "print(len(children) < 64, error)"), timeout=120))
        assert forks["stdout"] == "True 11\n", forks  # EAGAIN at the pids limit
        kc.execute("hog = bytearray(2 * 1024**3)")  # beyond 256m: the kernel is OOM-killed
        assert loop.run_until_complete(  # type: ignore[attr-defined]
            wait_until(lambda: _dead(km), timeout=60)), "an OOM-killed kernel must poll dead"
        assert loop.run_until_complete(km.provisioner.poll()) == 137  # type: ignore[attr-defined]
    finally:
        kc.stop_channels()
        loop.run_until_complete(km.shutdown_kernel(now=True))  # type: ignore[attr-defined]


async def _dead(km: object) -> bool:
    return not await km.is_alive()  # type: ignore[attr-defined]
