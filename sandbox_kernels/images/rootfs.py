"""Debian root filesystems built with debootstrap, cached by recipe hash.

One recipe serves both sandboxes: the ``docker`` flavour is python3 + ipykernel and an
``executor`` user (uid 1000); the ``vm`` flavour adds a kernel, sshd and the guest init on top
of a copy of it. debootstrap cannot resolve virtual packages, so it installs ``python3`` and
the rest is installed with ``apt-get`` inside the chroot.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..cache import cache_dir, recipe_hash
from ..errors import SandboxUnavailable
from ..progress import Progress, run_step

SUITE = "bookworm"
BASE_INCLUDE = ["python3", "procps", "ca-certificates"]
BASE_PACKAGES = ["python3-ipykernel"]
EXECUTOR_UID = 1000
_MARKER = ".sandbox-kernels-complete"


def mirror() -> str:
    """The Debian mirror (``SANDBOX_KERNELS_DEBIAN_MIRROR``, else deb.debian.org)."""
    return os.environ.get("SANDBOX_KERNELS_DEBIAN_MIRROR", "http://deb.debian.org/debian")


def require_root(what: str) -> None:
    """Image builds use debootstrap and chroot, which need root.

    Raises:
        SandboxUnavailable: not running as root, or debootstrap is missing.
    """
    if os.geteuid() != 0:
        raise SandboxUnavailable(f"{what} needs root (debootstrap, chroot): run it with sudo.")
    if not shutil.which("debootstrap"):
        raise SandboxUnavailable(f"{what} needs debootstrap: `apt-get install debootstrap`.")


def base_recipe() -> dict[str, object]:
    """What defines the base root filesystem (its hash keys the cache)."""
    return {"suite": SUITE, "include": BASE_INCLUDE, "packages": BASE_PACKAGES,
            "user": ["executor", EXECUTOR_UID], "version": 1}


def chroot_apt_install(root: Path, packages: list[str], progress: Progress, step: str) -> None:
    """Install ``packages`` inside ``root`` with apt-get (no recommends)."""
    env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
           "LC_ALL": "C"}
    run_step(["chroot", str(root), "apt-get", "install", "-y", "-q", "--no-install-recommends",
              *packages], step=step, timeout=900, progress=progress, env=env)


def finish_rootfs(root: Path) -> None:
    """Drop caches that only make images bigger."""
    for sub in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for entry in (root / sub).glob("*"):
            if entry.is_file() and entry.name != "lock":
                entry.unlink()
    (root / "etc/hostname").write_text("sandbox\n")


def ensure_base_rootfs(progress: Progress | None = None) -> Path:
    """The cached base root filesystem directory, built on first use.

    Raises:
        SandboxUnavailable: not root or debootstrap missing.
        SandboxError / SandboxTimeout: a build step failed or took too long.
    """
    recipe = base_recipe()
    target = cache_dir() / "rootfs" / f"base-{recipe_hash(recipe)}"
    if (target / _MARKER).exists():
        return target
    require_root("building the Debian root filesystem")
    progress = progress or Progress("rootfs", 3)
    work = target.with_name(target.name + ".tmp")
    shutil.rmtree(work, ignore_errors=True)
    work.parent.mkdir(parents=True, exist_ok=True)
    progress.step(f"debootstrap {SUITE} (downloads ~60 MB)")
    run_step(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_INCLUDE)}",
              SUITE, str(work), mirror()], step="debootstrap", timeout=1200, progress=progress)
    progress.step("install python3-ipykernel")
    chroot_apt_install(work, BASE_PACKAGES, progress, "apt-get install ipykernel")
    progress.step("create the executor user")
    run_step(["chroot", str(work), "useradd", "--create-home", "--uid", str(EXECUTOR_UID),
              "--shell", "/bin/sh", "executor"], step="useradd", timeout=60)
    finish_rootfs(work)
    (work / _MARKER).write_text(str(recipe))
    shutil.rmtree(target, ignore_errors=True)
    work.rename(target)
    return target
