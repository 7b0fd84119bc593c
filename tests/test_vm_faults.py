"""VM faults: a guest kernel panic, QEMU killed, the guest's sshd sessions killed, a full overlay
directory, a corrupt base image, an unreachable libvirtd. Each is detected, reported with what to do, and leaves nothing."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from jupyter_client import AsyncKernelManager
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.ioloop.restarter import AsyncIOLoopKernelRestarter
from traitlets.config import Config

from lifecycle import run_cell, start, wait_until
from sandbox_kernels.errors import SandboxError

pytestmark = pytest.mark.vm

EXEC_TIMEOUT = 240


def _domains() -> list[str]:
    out = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
                         capture_output=True, text=True, check=True, timeout=30)
    return out.stdout.split()


async def _start_refused(kernelspec_dir: Any, admin: dict[str, Any] | None = None, **config: Any) -> str:
    """Start a VM kernel that must fail: ``admin`` settings from Jupyter config (those only a
    server admin may widen), ``config`` from its kernelspec."""
    kdir = kernelspec_dir("sandbox-nixos-vm", name="fault", **config)
    km = AsyncKernelManager(kernel_name="fault", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kdir)]),
                            config=Config({"LibvirtProvisioner": admin or {}}))
    with pytest.raises(SandboxError) as info:
        await km.start_kernel()
    assert not km.has_kernel
    assert f"sandbox-kernels-{km.kernel_id}" not in _domains()
    return str(info.value)


async def _dead_soon(km: Any, timeout: float) -> bool:
    async def dead() -> bool:
        return await km.provisioner.poll() is not None
    return await wait_until(dead, timeout=timeout)


async def test_guest_kernel_panic_detected_and_restarted(kernelspec_dir: Any) -> None:
    # The guest panics on an NMI it cannot explain; QEMU injects one. With panic=-1 (always on)
    # the panicking guest resets at once and libvirt's on_reboot=destroy ends the domain.
    kdir = kernelspec_dir("sandbox-nixos-vm", name="panicky", extra_cmdline=["unknown_nmi_panic=1"])
    km, kc = await start("panicky", KernelSpecManager(kernel_dirs=[str(kdir)]), timeout=300)
    restarts: list[str] = []
    restarter = AsyncIOLoopKernelRestarter(kernel_manager=km, time_to_dead=1.0, parent=km)
    restarter.add_callback(lambda: restarts.append("restart"), "restart")
    try:
        await run_cell(kc, "before = 1", timeout=EXEC_TIMEOUT)
        domain = km.provisioner.sandbox_name
        subprocess.run(["virsh", "-c", "qemu:///system", "inject-nmi", domain], check=True,
                       capture_output=True, timeout=30)
        assert await _dead_soon(km, 60), "the panic was not detected"
        assert "Kernel panic" in _read(km.provisioner.console_path)
        assert domain not in _domains()
        restarter.start()
        assert await wait_until(lambda: _truthy(restarts), timeout=60), "no auto-restart"
        await kc.wait_for_ready(timeout=300)
        out = await run_cell(kc, "print('before' in globals())", timeout=EXEC_TIMEOUT)
        assert out["stdout"] == "False\n", "the kernel must come back, fresh, in a new VM"
    finally:
        restarter.stop()
        kc.stop_channels()
        await km.shutdown_kernel(now=True)


async def test_qemu_killed_is_detected() -> None:
    km, kc = await start("sandbox-nixos-vm", timeout=300)
    try:
        pid = _qemu_pid(km.provisioner.sandbox_name)
        os.kill(pid, signal.SIGKILL)
        assert await _dead_soon(km, 15), "a killed QEMU must poll dead"
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)
    assert f"sandbox-kernels-{km.kernel_id}" not in _domains()


async def test_ssh_port_taken_before_qemu_binds_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SSH port is free when chosen but closed again until QEMU binds it: when another
    process took it meanwhile, the VM starts on a new port (it failed to start before)."""
    import socket

    from sandbox_kernels.runtimes.vm import machine

    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    chosen = iter([taken])
    real = machine.free_port
    monkeypatch.setattr(machine, "free_port", lambda: next(chosen, 0) or real())
    try:
        km, kc = await start("sandbox-nixos-vm", timeout=300)
        try:
            assert km.provisioner.ssh_port not in (None, taken)
            out = await run_cell(kc, "print(6 * 7)", timeout=EXEC_TIMEOUT)
            assert out["stdout"] == "42\n"
        finally:
            kc.stop_channels()
            await km.shutdown_kernel(now=True)
    finally:
        squatter.close()


async def test_guest_sshd_sessions_killed_are_survived() -> None:
    """The kernel's user kills every sshd process it can reach in the guest (its SSH sessions;
    the listening daemon is root's): the provisioner reconnects, the kernel keeps its state."""
    km, kc = await start("sandbox-nixos-vm", timeout=300)
    try:
        await run_cell(kc, "kept = 7", timeout=EXEC_TIMEOUT)
        kc.execute(
            "import os, signal\n"
            "for p in os.listdir('/proc'):\n"
            "    try:\n"
            "        if p.isdigit() and open(f'/proc/{p}/comm').read().strip() == 'sshd':\n"
            "            os.kill(int(p), signal.SIGKILL)\n"
            "    except OSError:\n"
            "        pass\n"
        )
        await kc.wait_for_ready(timeout=EXEC_TIMEOUT)
        out = await run_cell(kc, "print(kept)", timeout=EXEC_TIMEOUT)
        assert out["stdout"] == "7\n"
        assert await km.provisioner.poll() is None
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)


async def test_full_overlay_directory_is_refused(kernelspec_dir: Any, tmp_path: Path) -> None:
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "sandbox-kernels-test", str(tiny)], check=True)
    try:
        message = await _start_refused(kernelspec_dir, admin={"images_dir": str(tiny)})
        assert "free" in message and "NIXOS_EPHEMERAL_VM_IMAGES_DIR" in message, message
        assert not any(tiny.iterdir()), "nothing may be left in the overlay directory"
    finally:
        subprocess.run(["umount", str(tiny)], check=True)


async def test_corrupt_base_image_is_refused(kernelspec_dir: Any, tmp_path: Path) -> None:
    bad = tmp_path / "broken.qcow2"
    bad.write_bytes(b"QFI\xfb" + os.urandom(4096))  # a qcow2 magic followed by garbage
    message = await _start_refused(kernelspec_dir, admin={"image_dirs": [str(tmp_path)]}, base_image=str(bad))
    assert str(bad) in message and ("qemu-img" in message or "rebuild" in message), message


async def test_images_outside_the_allowed_directories_are_refused(kernelspec_dir: Any, tmp_path: Path) -> None:
    message = await _start_refused(kernelspec_dir, base_image="/etc/passwd")
    assert "base_image='/etc/passwd'" in message and "image_dirs" in message, message
    message = await _start_refused(kernelspec_dir, guest_kernel="/boot/../etc/shadow")
    assert "guest_kernel" in message and "outside" in message, message
    # A qcow2 in an allowed directory whose backing file is not.
    allowed = tmp_path / "images"
    allowed.mkdir()
    outside = tmp_path / "secret.img"
    outside.write_bytes(b"secret" * 1000)
    sneaky = allowed / "sneaky.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(outside), str(sneaky)],
                   check=True)
    message = await _start_refused(kernelspec_dir, admin={"image_dirs": [str(allowed)]}, base_image=str(sneaky))
    assert "backing file" in message and "outside" in message, message


async def test_unreachable_libvirtd_says_how_to_start_it(kernelspec_dir: Any, tmp_path: Path) -> None:
    uri = f"qemu+unix:///system?socket={tmp_path}/no-libvirtd.sock"
    message = await _start_refused(kernelspec_dir, admin={"libvirt_uri": uri})
    assert "libvirtd" in message and "-d" in message, message


def _qemu_pid(domain: str) -> int:
    from sandbox_kernels.runtimes.vm.libvirt_conn import LibvirtHost

    with LibvirtHost() as host:
        pid = host.qemu_pid(domain)
    assert pid, f"no QEMU process for {domain}"
    return pid


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


async def _truthy(items: list[str]) -> bool:
    return bool(items)


def test_reap_finds_a_passt_whose_vm_is_gone(tmp_path: Path) -> None:
    """passt (the outbound NIC of a VM with allow_network) exits with its QEMU; one that did
    not (stuck, here one that never got a QEMU) is listed and removed by `reap`."""
    import shutil
    import time

    from sandbox_kernels import reap
    from sandbox_kernels.runtimes.vm import outbound

    if shutil.which("passt") is None:
        pytest.fail("passt is not installed (scripts/setup.sh installs it)")
    kernel_id = "gone-0123456789"
    sockets = tmp_path / "passt"
    sockets.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chown(sockets, outbound.net_uid(), -1)
    proc = subprocess.Popen([outbound.ARGV0 + kernel_id.encode().hex(), "-f", "-q", "--runas", outbound.NET_USER,
                             "-s", str(sockets / "s.sock"), "-l", str(tmp_path / "passt.log"), "-4"],
                            executable=shutil.which("passt"), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while (proc.pid, kernel_id) not in set(outbound.leftover_processes()):
            assert proc.poll() is None and time.monotonic() < deadline, "passt did not start"
            time.sleep(0.1)
        # (only this orphan is removed: other sandboxes on this shared machine are not ours)
        found = [o for o in reap.find_orphans() if o.name == f"pid {proc.pid} (kernel {kernel_id})"]
        assert [o.kind for o in found] == ["passt"]
        found[0].remove()
        assert proc.wait(10) is not None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
