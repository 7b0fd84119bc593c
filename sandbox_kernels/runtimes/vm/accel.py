"""Choose the libvirt domain type: ``kvm`` (hardware virtualization) or ``qemu`` (TCG emulation).

The setting is ``auto``, ``kvm`` or ``qemu``. ``auto`` decides once per host and caches the
verdict under ``cache_dir()/accel/``, keyed by the host kernel release, whether ``/dev/kvm``
exists, and the guest kernel path:

* no ``/dev/kvm``                      -> ``qemu``
* the host runs paravirtual KVM        -> ``qemu`` (``/sys/module/kvm_pvm``: stock guest
                                          kernels crash under it)
* a probe boot under KVM fails         -> ``qemu``
* otherwise                            -> ``kvm``

The probe boots the guest kernel with ``qemu-system-x86_64 -accel kvm`` and a tiny initramfs
whose ``/init`` (the host's ``/bin/sh``) prints a marker on the serial console; reaching that
marker means the guest got to userspace. The probe is killed after a hard timeout, so a hang
counts as a failure and never blocks the caller for longer. Every ``qemu`` verdict is logged
as a WARNING: TCG works but is several times slower.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ...cache import cache_dir, recipe_hash
from ...errors import SandboxConfigError, SandboxUnavailable
from .cpio import Cpio

log = logging.getLogger("sandbox_kernels.vm")

SETTINGS = ("auto", "kvm", "qemu")
PROBE_MARKER = "SANDBOX-KVM-PROBE-USERSPACE"
PROBE_TIMEOUT = 20.0
_KVM = Path("/dev/kvm")
_KVM_PVM = Path("/sys/module/kvm_pvm")
_LDD_PATH = re.compile(r"(/\S+)")


@dataclass(frozen=True)
class AccelChoice:
    """The domain type to use and why.

    Attributes:
        domain_type: ``kvm`` or ``qemu``.
        reason: one sentence a person can read in logs and ``doctor`` output.
        probed: whether a probe boot was run for this verdict (now or when it was cached).
    """

    domain_type: str
    reason: str
    probed: bool = False


def choose_domain_type(setting: str = "auto", guest_kernel: str | os.PathLike[str] | None = None,
                       use_cache: bool = True) -> AccelChoice:
    """Decide between ``kvm`` and ``qemu`` (see the module docstring).

    Args:
        setting: ``auto``, ``kvm`` or ``qemu``.
        guest_kernel: the kernel a probe boots (no probe without one).
        use_cache: reuse (and store) the cached ``auto`` verdict.

    Raises:
        SandboxConfigError: ``setting`` is not one of ``auto``, ``kvm``, ``qemu``.
        SandboxUnavailable: ``kvm`` was asked for but ``/dev/kvm`` is missing.
    """
    if setting not in SETTINGS:
        raise SandboxConfigError(f"accelerator setting {setting!r} must be one of {', '.join(SETTINGS)}.")
    if setting == "qemu":
        return AccelChoice("qemu", "the accelerator setting is 'qemu' (TCG emulation)")
    if setting == "kvm":
        if not _KVM.exists():
            raise SandboxUnavailable("the accelerator setting is 'kvm' but /dev/kvm does not exist: "
                                     "enable virtualization or use 'auto' or 'qemu'.")
        return AccelChoice("kvm", "the accelerator setting is 'kvm'")
    key = recipe_hash({"release": platform.release(), "kvm": _KVM.exists(),
                       "kernel": str(guest_kernel or "")})
    cached = cache_dir() / "accel" / f"{key}.json"
    if use_cache:
        try:
            choice = AccelChoice(**json.loads(cached.read_text()))
        except (OSError, ValueError, TypeError):
            pass
        else:
            _warn(choice)
            return choice
    choice = _decide(guest_kernel)
    _warn(choice)
    if use_cache:
        cached.parent.mkdir(exist_ok=True)
        tmp = cached.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(choice)))
        os.replace(tmp, cached)
    return choice


def _decide(guest_kernel: str | os.PathLike[str] | None) -> AccelChoice:
    if not _KVM.exists():
        return AccelChoice("qemu", "/dev/kvm does not exist (no hardware virtualization here)")
    if _KVM_PVM.exists():
        return AccelChoice(
            "qemu", "the host kernel runs paravirtual KVM (module kvm_pvm is loaded): stock guest "
            "kernels crash under it, so VMs run with TCG emulation")
    if not os.access(_KVM, os.R_OK | os.W_OK):
        return AccelChoice("kvm", "/dev/kvm exists (not probed: this user cannot open it)")
    if guest_kernel is None:
        return AccelChoice("kvm", "/dev/kvm exists (not probed: no guest kernel given)")
    ok, detail = probe_kvm(guest_kernel)
    if ok:
        return AccelChoice("kvm", f"a probe boot under KVM reached userspace ({detail})", True)
    return AccelChoice("qemu", f"a probe boot of {guest_kernel} under KVM failed: {detail}", True)


def _warn(choice: AccelChoice) -> None:
    if choice.domain_type == "qemu" and not choice.reason.startswith("the accelerator setting"):
        log.warning("VMs will run WITHOUT hardware acceleration (libvirt domain type 'qemu', "
                    "TCG), several times slower: %s.", choice.reason)
    else:
        log.info("VM accelerator: %s (%s)", choice.domain_type, choice.reason)


def probe_kvm(guest_kernel: str | os.PathLike[str], timeout: float = PROBE_TIMEOUT,
              accel: str = "kvm") -> tuple[bool, str]:
    """Boot ``guest_kernel`` under ``accel`` with a marker-printing initramfs.

    Returns:
        ``(True, "<seconds> s")`` if the marker reached the serial console within ``timeout``;
        ``(False, reason)`` on a crash, an early exit or a timeout (the VM is killed).

    Raises:
        SandboxUnavailable: qemu-system-x86_64 is not installed.
    """
    qemu = shutil.which("qemu-system-x86_64")
    if not qemu:
        raise SandboxUnavailable("qemu-system-x86_64 is missing: `apt-get install qemu-system-x86`.")
    with tempfile.TemporaryDirectory(prefix="sandbox-kernels-probe-") as tmp:
        initrd = Path(tmp) / "probe.cpio"
        initrd.write_bytes(probe_initramfs())
        argv = [qemu, "-accel", accel, "-nodefaults", "-nographic", "-no-reboot",
                "-monitor", "none", "-serial", "stdio", "-m", "256",
                "-kernel", str(guest_kernel), "-initrd", str(initrd),
                "-append", "console=ttyS0 panic=-1 rdinit=/init"]
        if accel == "kvm":
            argv[1:1] = ["-cpu", "host"]
        start = time.monotonic()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            text = out.decode(errors="replace")
            if PROBE_MARKER in text:
                return True, f"{time.monotonic() - start:.1f} s"
            return False, f"no userspace within {timeout:g} s ({_last_line(text)})"
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    text = out.decode(errors="replace")
    if PROBE_MARKER in text:
        return True, f"{time.monotonic() - start:.1f} s"
    return False, f"QEMU exited with {proc.returncode} before userspace ({_last_line(text)})"


def probe_initramfs() -> bytes:
    """A newc cpio archive: ``/init`` (a shell script), the host's ``/bin/sh`` and its libraries."""
    shell = os.path.realpath("/bin/sh")
    files = {"/bin/sh": shell}
    ldd = subprocess.run(["ldd", shell], capture_output=True, text=True, timeout=10)
    for line in ldd.stdout.splitlines():
        for path in _LDD_PATH.findall(line):
            if os.path.exists(path):
                files[path] = os.path.realpath(path)
    archive = Cpio()
    dirs = sorted({str(p) for f in [*files, "/init", "/dev/console"] for p in Path(f).parents} - {"/"})
    for directory in dirs:
        archive.directory(directory)
    archive.char_device("/dev/console", 5, 1)
    for name, source in files.items():
        archive.file(name, Path(source).read_bytes(), 0o755)
    archive.file("/init", f"#!/bin/sh\necho {PROBE_MARKER}\n".encode(), 0o755)
    return archive.finish()


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"last console line: {lines[-1][:160]!r}" if lines else "no console output"
