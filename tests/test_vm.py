"""The libvirt runtime ("Python (NixOS VM)") against real libvirtd, QEMU (TCG here) and sshd."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from lifecycle import LifecycleSuite, Runtime, run_cell, start
from sandbox_kernels.errors import HostKeyMismatch, SandboxStartError

EXEC_TIMEOUT = 240  # a TCG guest on a loaded two-core machine is slow

pytestmark = pytest.mark.vm


def _domains() -> list[str]:
    out = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
                         capture_output=True, text=True, check=True, timeout=30)
    return out.stdout.split()


def _destroy(kernel_id: str) -> None:
    subprocess.run(["virsh", "-c", "qemu:///system", "destroy", f"sandbox-kernels-{kernel_id}"],
                   check=True, capture_output=True, timeout=60)


VM = Runtime(
    kernel_name="sandbox-nixos-vm",
    sandbox_exists=lambda kid: f"sandbox-kernels-{kid}" in _domains(),
    destroy_externally=_destroy,
    bad_settings=[
        ({"memory_mb": 5}, "memory_mb"),
        ({"vcpus": "lots"}, "vcpus"),
        ({"base_image": "/nonexistent/image.qcow2"}, "image"),
        ({"base_image": "/etc/passwd"}, "image_dirs"),
        ({"workspace": "../etc"}, "workspace"),
        ({"accelerator": "warp"}, "accelerator"),
    ],
    start_timeout=300,
    exec_timeout=240,
)


class TestVMLifecycle(LifecycleSuite):
    @pytest.fixture
    def runtime(self) -> Runtime:
        return VM

    async def test_runs_in_the_sandbox(self, kernel: Any, runtime: Runtime) -> None:
        km, kc = kernel
        out = await run_cell(kc, (
            "import os, platform, socket\n"
            "print(socket.gethostname(), platform.release(), os.getuid())\n"
            "print([l for l in open('/proc/cpuinfo') if l.startswith('model name')][0].strip())\n"
            "routes = [l.split()[1] for l in open('/proc/net/route').read().splitlines()[1:]]\n"
            "print('net: default route' if '00000000' in routes else 'net: no default route')"
        ), timeout=EXEC_TIMEOUT)
        first, cpu, net = out["stdout"].splitlines()
        host, release, uid = first.split()
        assert host.startswith("sandbox-") and uid == "1000"
        assert release != subprocess.run(["uname", "-r"], capture_output=True, text=True).stdout.strip()
        assert "QEMU" in cpu or cpu != _host_cpu(), cpu
        # No way out but slirp's own network (restrict=on); tests/hostile/ tries the host.
        assert net == "net: no default route", net
        # The forwarded SSH port listens on 127.0.0.1 only; the keys are private.
        prov = km.provisioner
        listeners = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True).stdout
        assert f"127.0.0.1:{prov.ssh_port} " in listeners
        assert f"0.0.0.0:{prov.ssh_port} " not in listeners and f"*:{prov.ssh_port} " not in listeners
        key_dir = Path(prov._keys["client"]).parent
        assert key_dir.stat().st_mode & 0o777 == 0o700
        assert all(p.stat().st_mode & 0o077 == 0 for p in key_dir.iterdir() if not p.name.endswith(".pub"))

    async def test_tunnel_drop_recovers(self, kernel: Any) -> None:
        km, kc = kernel
        await run_cell(kc, "kept = 7", timeout=EXEC_TIMEOUT)
        tunnel = km.provisioner.tunnel
        ports = dict(km.get_connection_info())
        tunnel._transport.sock.shutdown(2)  # the SSH TCP connection dies under the tunnel
        # ZMQ reconnects by itself; outputs published before the iopub socket has
        # resubscribed would be lost (as after any reconnect), so wait for a kernel_info reply.
        await kc.wait_for_ready(timeout=EXEC_TIMEOUT)
        out = await run_cell(kc, "print(kept)", timeout=EXEC_TIMEOUT)
        assert out["stdout"] == "7\n"
        assert dict(km.get_connection_info()) == ports, "clients must not see the reconnect"

    async def test_restarts_fork_from_the_preloader(self, kernel: Any) -> None:
        """A restart forks the next kernel from the process that imported ipykernel once;
        kernels forked from it do not share random state."""
        km, kc = kernel
        probe = "import os, random\nprint(os.getppid(), random.random(), os.getpid())"
        first = (await run_cell(kc, probe, timeout=EXEC_TIMEOUT))["stdout"].split()
        await km.restart_kernel(now=True)
        await kc.wait_for_ready(timeout=EXEC_TIMEOUT)
        second = (await run_cell(kc, probe, timeout=EXEC_TIMEOUT))["stdout"].split()
        assert first[0] == second[0] != "1", "both kernels are children of the same preloader"
        assert first[1] != second[1], "forked kernels must not repeat each other's random numbers"
        assert first[2] != second[2] and int(second[2]) == km.provisioner.pid

    async def test_memory_snapshot_rollback(self, kernel: Any) -> None:
        from sandbox_kernels.snapshots.service import SnapshotService

        km, kc = kernel
        service = SnapshotService(km.provisioner)
        await run_cell(kc, "x = 1\nopen('before.txt', 'w').write('b')", timeout=EXEC_TIMEOUT)
        snap = await service.create("s1")
        assert snap.kind == "memory"
        await run_cell(kc, "y = 2\nopen('after.txt', 'w').write('a')", timeout=EXEC_TIMEOUT)
        result = await service.rollback("s1")
        assert result.kernel_restarted is False
        out = await run_cell(kc, "import os\nprint('x' in globals(), 'y' in globals(), "
                                 "os.path.exists('before.txt'), os.path.exists('after.txt'))", timeout=EXEC_TIMEOUT)
        assert out["stdout"] == "True False True False\n", out
        assert [s.name for s in await service.list()] == ["s1"]
        await service.delete("s1")


def _host_cpu() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.strip()
    return ""


async def test_host_key_mismatch_refused(jp_asyncio_loop: Any) -> None:
    from sandbox_kernels.ssh.keys import generate_keypair

    km, kc = await start("sandbox-nixos-vm", timeout=300)
    try:
        prov = km.provisioner
        prov.machine.keys = dataclasses.replace(prov.machine.keys,
                                                host_public=generate_keypair("impostor").public_line)
        with pytest.raises(HostKeyMismatch) as info:
            await prov.open_tunnel()
        assert "host key" in str(info.value).lower()
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)


def test_concurrency_limit_queues_a_start_until_a_slot_frees(tmp_path: Path) -> None:
    """NIXOS_MAX_CONCURRENT_VMS=2 with both slots held: a papermill run waits in line (it says so),
    and runs to the end once a slot frees. Waits on those states, never on timing."""
    import os
    import queue
    import sys
    import threading

    from sandbox_kernels.runtimes.vm.slots import slots_dir, try_acquire_slot

    held = [try_acquire_slot(slots_dir(), 2) for _ in range(2)]
    try:
        assert all(held), "the test could not take both VM slots (is another VM kernel running?)"
        env = {**os.environ, "NIXOS_MAX_CONCURRENT_VMS": "2"}
        nb = Path(__file__).parent / "notebooks" / "smoke.ipynb"
        proc = subprocess.Popen([str(Path(sys.executable).parent / "papermill"), "-k", "sandbox-nixos-vm",
                                 str(nb), str(tmp_path / "out.ipynb"), "--log-output"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
        lines: queue.Queue[str | None] = queue.Queue()
        reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout] + [lines.put(None)],
                                  daemon=True)
        reader.start()
        seen: list[str] = []
        while not any("waiting for a VM slot" in line for line in seen):
            line = lines.get(timeout=300)
            assert line is not None, f"papermill ended without waiting for a slot:\n{''.join(seen)[-4000:]}"
            seen.append(line)
        assert proc.poll() is None, "the run must wait while both slots are held"
        held.pop().release()
        proc.wait(timeout=900)
        reader.join(30)
        while (line := lines.get_nowait() if not lines.empty() else None) is not None:
            seen.append(line)
        output = "".join(seen)
        assert proc.returncode == 0, output[-4000:]
        assert "a VM slot is free" in output, output[-4000:]
        assert "sum=" in json.dumps(json.loads((tmp_path / "out.ipynb").read_text())["cells"])
    finally:
        for slot in held:
            if slot is not None:
                slot.release()


async def test_boot_failure_shows_console(kernelspec_dir: Any, tmp_path: Path) -> None:
    """A guest that never starts sshd: the start fails as soon as the guest stops, with the
    console tail, not when the 60 s ready timeout runs out."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    # init=/bin/sleep: the guest kernel boots, but its init never starts sshd (it exits at once
    # for want of an operand, and the guest panics). The start must end well within the ready
    # timeout (a SandboxStartError, not a SandboxTimeout) and show the serial console.
    kdir = kernelspec_dir("sandbox-nixos-vm", name="noboot", ssh_ready_timeout=60,
                          extra_cmdline=["init=/bin/sleep"])
    ksm = KernelSpecManager(kernel_dirs=[str(kdir)])
    km = AsyncKernelManager(kernel_name="noboot", kernel_spec_manager=ksm)
    with pytest.raises(SandboxStartError) as info:
        await km.start_kernel()
    text = str(info.value)
    assert not isinstance(info.value, TimeoutError), text
    assert "Console" in text and "sleep" in text, text
    assert "stopped during boot" in text or "failed to boot" in text, text
    assert f"sandbox-kernels-{km.kernel_id}" not in _domains()


async def test_workspace_disk_persists_across_kernels(kernelspec_dir: Any, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A named workspace is a second disk mounted at the working directory; it outlives kernels."""
    from jupyter_client.kernelspec import KernelSpecManager

    monkeypatch.setenv("NIXOS_WORKSPACE_VM_IMAGES_DIR", str(tmp_path / "workspaces"))
    ksm = KernelSpecManager(kernel_dirs=[str(kernelspec_dir("sandbox-nixos-vm", name="ws", workspace="proj1"))])
    for step, code, expected in [
        (1, "import os; open('notes.txt', 'w').write('kept'); print(os.getcwd())", "/home/executor/work\n"),
        (2, "print(open('notes.txt').read())", "kept\n"),
    ]:
        km, kc = await start("ws", ksm=ksm, timeout=300)
        try:
            out = await run_cell(kc, code, timeout=EXEC_TIMEOUT)
            assert out["stdout"] == expected, (step, out)
        finally:
            kc.stop_channels()
            await km.shutdown_kernel()
    assert (tmp_path / "workspaces" / "proj1.qcow2").exists()


async def test_qemu_killed_is_detected() -> None:
    """QEMU dies (SIGKILL from outside): the kernel polls dead at once, and shutdown cleans up."""
    import os
    import signal

    from lifecycle import wait_until

    km, kc = await start("sandbox-nixos-vm", timeout=300)
    try:
        prov = km.provisioner
        pid = prov._host.qemu_pid(prov.sandbox_name)
        assert pid
        os.kill(pid, signal.SIGKILL)

        async def dead() -> bool:
            return not await km.is_alive()

        assert await wait_until(dead, timeout=30)
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)
    assert f"sandbox-kernels-{km.kernel_id}" not in _domains()
