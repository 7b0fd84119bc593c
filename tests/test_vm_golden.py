"""VM kernels restored from a golden memory snapshot (real libvirtd, QEMU and guest).

``make test``'s set-up builds the golden snapshot of the shipped ``sandbox-nixos-vm``
kernelspec (``sandbox-kernels vm golden``), so kernels of that spec start from it here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from lifecycle import run_cell, start

pytestmark = pytest.mark.vm

EXEC_TIMEOUT = 240
CLI = str(Path(sys.executable).parent / "sandbox-kernels")

_IDENTITY = (
    "import json, os, random, socket, subprocess, time\n"
    "fresh = subprocess.run(['python3', '-c', 'import os; print(os.urandom(16).hex())'],\n"
    "                       capture_output=True, text=True).stdout.strip()\n"
    "print(json.dumps({'hostname': socket.gethostname(), 'time': time.time(),\n"
    "    'authorized': open('/etc/ssh/sandbox-authorized-keys/executor').read().strip(),\n"
    "    'urandom': fresh, 'random': random.random(),\n"
    "    'parent': open(f'/proc/{os.getppid()}/cmdline').read()}))"
)


async def test_clones_start_from_the_golden_snapshot_with_their_own_secrets(jp_asyncio_loop: Any) -> None:
    """Two kernels at once: both restored, each with its own host key, client key, hostname,
    clock, kernel RNG and Python random state, and both run code."""
    started = await asyncio.gather(*(start("sandbox-nixos-vm", timeout=300) for _ in range(2)))
    try:
        seen = []
        for km, kc in started:
            prov = km.provisioner
            assert prov.start_mode == "golden", "the kernel booted: is the golden snapshot built?"
            out = await run_cell(kc, _IDENTITY, timeout=EXEC_TIMEOUT)
            assert out["status"] == "ok", out
            facts = json.loads(out["stdout"])
            assert facts["hostname"] == f"sandbox-{km.kernel_id[:8]}"
            assert abs(facts["time"] - time.time()) < 60, "the clone kept the golden VM's clock"
            client_public = Path(prov._keys["client"] + ".pub").read_text().split()[:2]
            assert facts["authorized"].split()[:2] == client_public
            # Forked by the preloader the golden VM had started (restored, not started again).
            assert "kernel_preloader.py" in facts["parent"]
            seen.append((facts, prov._keys["host_public"]))
        (a, host_a), (b, host_b) = seen
        assert host_a != host_b  # and the tunnels pin each one, so each sshd serves its own
        assert a["urandom"] != b["urandom"], "two clones share their kernel RNG state"
        assert a["random"] != b["random"], "two clones share Python's random state"
    finally:
        for km, kc in started:
            kc.stop_channels()
            await km.shutdown_kernel(now=True)


async def test_a_broken_golden_snapshot_falls_back_to_booting(
        jp_asyncio_loop: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """A golden overlay QEMU cannot load: the start warns and boots, and nothing leaks."""
    from sandbox_kernels.runtimes.vm import golden

    bad = tmp_path / "root.qcow2"
    bad.write_bytes(b"QFI\xfb" + b"\0" * 4096)  # a qcow2 magic and nothing valid after it
    broken = golden.Golden("0" * 16, bad, "<domainsnapshot/>", 1, time.time())
    monkeypatch.setattr(golden, "load", lambda key, root=None: broken)
    caplog.set_level(logging.WARNING)
    km, kc = await start("sandbox-nixos-vm", timeout=300)
    try:
        assert km.provisioner.start_mode == "boot"
        out = await run_cell(kc, "print(6 * 7)", timeout=EXEC_TIMEOUT)
        assert out["stdout"].strip() == "42"
        assert any("could not start from golden snapshot" in r.getMessage() for r in caplog.records)
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)


def test_golden_key_follows_the_configuration(kernelspec_dir: Any) -> None:
    """What a clone must share with its golden VM is in the key; workspaces are not served."""
    from jupyter_client.kernelspec import KernelSpecManager

    from sandbox_kernels.runtimes.vm.provisioner import LibvirtProvisioner
    from sandbox_kernels.runtimes.vm.domain_xml import DomainSpec

    spec = KernelSpecManager().get_kernel_spec("sandbox-nixos-vm")

    def key(memory: int = 512, env: dict[str, str] | None = None, **config: Any) -> str:
        prov = LibvirtProvisioner(kernel_id="k", kernel_spec=spec, **config)
        if env is not None:
            prov.kernel_spec = type(spec)(**{**spec.to_dict(), "env": env})
        dom = DomainSpec(kernel_id="k", domain_type="qemu", memory_mib=memory, vcpus=1,
                         kernel=prov.kernel_path, initrd=prov.initrd_path, root="/r", seed="/s",
                         serial_log="/c", ssh_port=2222)
        return str(prov.golden.key(dom))

    assert key() == key()
    assert key() != key(memory=384)
    assert key() != key(env={"PYTHONPATH": "/x"})
    assert key() != key(ssh_user="someone")
    assert LibvirtProvisioner(kernel_id="k", kernel_spec=spec).golden.eligible()
    assert not LibvirtProvisioner(kernel_id="k", kernel_spec=spec, workspace="w").golden.eligible()
    assert not LibvirtProvisioner(kernel_id="k", kernel_spec=spec, golden_snapshot=False).golden.eligible()


def test_cli_builds_once_lists_and_refuses_other_kernels() -> None:
    """`vm golden` finds the set-up's snapshot (no second build); `--list` shows it."""
    built = subprocess.run([CLI, "vm", "golden"], capture_output=True, text=True, timeout=900)
    assert built.returncode == 0, built.stderr
    assert "booting the VM" not in built.stderr, "the golden snapshot was built again"
    key = built.stdout.split("golden snapshot ")[1].split()[0]
    listed = subprocess.run([CLI, "vm", "golden", "--list"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and key in listed.stdout, listed.stdout
    wrong = subprocess.run([CLI, "vm", "golden", "sandbox-docker"], capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 2 and "is not a VM kernel" in wrong.stderr, wrong.stderr
    missing = subprocess.run([CLI, "vm", "golden", "no-such-kernel"], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "install-kernelspecs" in missing.stderr, missing.stderr
