"""The CI/test VM guest: a Debian qcow2 with a kernel and initrd for direct kernel boot.

The guest is a copy of the cached debootstrap root filesystem plus a cloud kernel, sshd and
our PID 1 (``guest/sandbox-init``, which keeps the guest contract described there). The disk
is made without loop mounts: ``mkfs.ext4 -d`` fills a raw file from the directory and
``qemu-img convert`` turns it into qcow2. Results are cached under ``cache_dir()/vm/``::

    debian-<hash>.qcow2 / .vmlinuz / .initrd / .os-release   one build per recipe hash
    debian-guest.qcow2 / ...                     symlinks to the newest build, the default
                                                 of NIXOS_SANDBOX_BASE_IMAGE

Overlays must name the resolved (hashed) path as their backing file, never the symlink, so a
rebuild cannot change the disk under a running sandbox.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ...cache import cache_dir, recipe_hash
from ...errors import SandboxError, SandboxUnavailable
from ...progress import Progress, run_step
from ...images.guest_os import record_path
from .initrd import INITRD_INIT, build_initrd
from ...images.rootfs import base_recipe, chroot_apt_install, ensure_base_rootfs, require_root

GUEST_DIR = Path(__file__).resolve().parents[2] / "guest"
INIT_SCRIPT = GUEST_DIR / "sandbox-init"
SSHD_CONFIG = GUEST_DIR / "sshd_config"
VM_PACKAGES = ["linux-image-cloud-amd64", "initramfs-tools", "kmod", "openssh-server", "iproute2",
               "busybox-static"]
#: Modules our initrd loads so it can mount the root disk (built-in ones are skipped).
INITRD_MODULES = ["virtio_pci", "virtio_blk", "ext4"]
#: Free space left on the root filesystem for the kernel user's files, in MiB.
HEADROOM_MIB = 1024
STABLE_NAME = "debian-guest"
SUFFIXES = (".qcow2", ".vmlinuz", ".initrd", ".os-release")

#: initramfs-tools must be installed (the kernel package depends on it) but its initrd is
#: replaced by ours (initrd.py); MODULES=list keeps its unused build short.
_INITRAMFS_CONF = "MODULES=list\nBUSYBOX=n\nCOMPRESS=gzip\n"
_POLICY_RC = "#!/bin/sh\n# no services start while the image is built\nexit 101\n"


def vm_dir() -> Path:
    """``cache_dir()/vm``: where VM images are kept (mode 0755: qemu reads them)."""
    path = cache_dir() / "vm"
    path.mkdir(mode=0o755, exist_ok=True)
    return path


def vm_recipe() -> dict[str, object]:
    """What defines the VM image (with the init script and sshd config, its hash keys the cache)."""
    return {"rootfs": base_recipe(), "packages": VM_PACKAGES, "initrd_modules": INITRD_MODULES,
            "headroom_mib": HEADROOM_MIB, "version": 2}


def image_stem() -> str:
    """``debian-<hash>``: the file name stem of the image the current recipe produces."""
    return f"debian-{recipe_hash(vm_recipe(), INIT_SCRIPT, SSHD_CONFIG, INITRD_INIT)}"


def default_image() -> Path:
    """The stable path ``cache_dir()/vm/debian-guest.qcow2`` (a symlink to the newest build)."""
    return cache_dir() / "vm" / f"{STABLE_NAME}.qcow2"


def boot_files(image: str | os.PathLike[str]) -> tuple[Path, Path]:
    """The kernel and initrd that sit next to ``image`` (``<name>.vmlinuz``, ``<name>.initrd``)."""
    path = Path(image)
    stem = path.with_suffix("") if path.suffix == ".qcow2" else path
    return stem.with_name(stem.name + ".vmlinuz"), stem.with_name(stem.name + ".initrd")


def boot_cmdline(image: str | os.PathLike[str]) -> tuple[str, ...]:
    """Extra kernel command line words from ``<name>.cmdline`` next to ``image``, if present.

    A NixOS image ships one holding ``init=/nix/store/...-nixos-system-.../init``: it comes
    after our default ``init=/sbin/sandbox-init`` on the command line, and the last one wins.
    """
    path = Path(image)
    stem = path.with_suffix("") if path.suffix == ".qcow2" else path
    for candidate in (stem.with_name(stem.name + ".cmdline"),
                      Path(os.path.realpath(stem)).with_name(Path(os.path.realpath(stem)).name + ".cmdline")):
        if candidate.is_file():
            return tuple(candidate.read_text().split())
    return ()


def build_vm_image(force: bool = False) -> str:
    """Build (or reuse) the Debian guest image and point the ``debian-guest.*`` links at it.

    Args:
        force: rebuild even when an image of the current recipe is cached.

    Returns:
        The path of the qcow2 (``cache_dir()/vm/debian-<hash>.qcow2``).

    Raises:
        SandboxUnavailable: not root, or debootstrap, mkfs.ext4 or qemu-img is missing.
        SandboxError / SandboxTimeout: a build step failed or took too long.
    """
    directory = vm_dir()
    stem = image_stem()
    image = directory / f"{stem}.qcow2"
    progress = Progress("image vm", 7)
    if image.exists() and not force:
        if not record_path(image).exists():  # cached before the OS was recorded
            _record_os(ensure_base_rootfs(), directory / stem)
        _link_stable(directory, stem)
        progress.finish(f"{image} is up to date (cached)")
        return str(image)
    require_root("building the VM image")
    for tool in ("mkfs.ext4", "qemu-img"):
        if not shutil.which(tool):
            raise SandboxUnavailable(f"building the VM image needs {tool}: "
                                     "`apt-get install e2fsprogs qemu-utils`.")
    work = directory / f"{stem}.build"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(mode=0o700)
    try:
        base = ensure_base_rootfs()  # reports its own steps if it has to build
        root = work / "root"
        progress.step("copy the base root filesystem")
        run_step(["cp", "-a", "--reflink=auto", str(base), str(root)], step="copy rootfs",
                 timeout=600, progress=progress)
        _install_packages(root, progress)
        progress.step("install the guest init and sshd config")
        vmlinuz, initrd = _configure(root, work)
        _record_os(root, work / "image")
        raw = work / "root.raw"
        progress.step("make the ext4 filesystem (mkfs.ext4 -d)")
        _make_filesystem(root, raw, progress)
        progress.step("convert to qcow2")
        qcow2 = work / "image.qcow2"
        run_step(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)],
                 step="qemu-img convert", timeout=600, progress=progress)
        progress.step("store the image")
        for source, suffix in ((vmlinuz, ".vmlinuz"), (initrd, ".initrd"),
                               (work / "image.os-release", ".os-release"), (qcow2, ".qcow2")):
            os.chmod(source, 0o644)
            os.replace(source, directory / f"{stem}{suffix}")  # the qcow2 last: it marks "done"
        _link_stable(directory, stem)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    size = image.stat().st_size / 2**20
    progress.finish(f"built {image} ({size:.0f} MiB)")
    return str(image)


def _install_packages(root: Path, progress: Progress) -> None:
    """apt-get update and install the kernel, initramfs-tools, sshd and iproute2 in ``root``."""
    conf = root / "etc/initramfs-tools"
    (conf / "conf.d").mkdir(parents=True, exist_ok=True)
    (conf / "conf.d/sandbox-kernels.conf").write_text(_INITRAMFS_CONF)
    policy = root / "usr/sbin/policy-rc.d"
    policy.write_text(_POLICY_RC)
    policy.chmod(0o755)
    shutil.copyfile("/etc/resolv.conf", root / "etc/resolv.conf")
    env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
           "LC_ALL": "C"}
    progress.step("apt-get update in the guest root")
    run_step(["chroot", str(root), "apt-get", "update", "-q"], step="apt-get update",
             timeout=600, progress=progress, env=env)
    progress.step(f"install {', '.join(VM_PACKAGES)} (downloads ~70 MB)")
    chroot_apt_install(root, VM_PACKAGES, progress, "apt-get install kernel and sshd")
    policy.unlink()


def _configure(root: Path, work: Path) -> tuple[Path, Path]:
    """Install our init and sshd config, lock down accounts, move the kernel and initrd out.

    Returns:
        The kernel and initrd, moved to ``work``.
    """
    init = root / "sbin/sandbox-init"
    shutil.copyfile(INIT_SCRIPT, init)
    init.chmod(0o755)
    shutil.copyfile(SSHD_CONFIG, root / "etc/ssh/sandbox_sshd_config")
    (root / "etc/ssh/sandbox_sshd_config").chmod(0o644)
    # Build-time host keys would be shared by every VM: the seed brings each VM its own.
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    # "*": no password can match, yet the account is not "locked" (sshd without PAM refuses
    # accounts whose hash starts with "!").
    run_step(["chroot", str(root), "usermod", "--password", "*", "executor"], step="usermod",
             timeout=60)
    (root / "etc/resolv.conf").write_text("")
    (root / "etc/hostname").write_text("sandbox\n")
    (root / ".sandbox-kernels-complete").unlink(missing_ok=True)
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise SandboxError(f"expected one kernel in {root / 'boot'}, found "
                           f"{[p.name for p in kernels]}")
    vmlinuz, initrd = work / "vmlinuz", work / "initrd"
    shutil.move(kernels[0], vmlinuz)
    initrd.write_bytes(build_initrd(root, INITRD_MODULES))
    for unused in (root / "boot").glob("initrd.img-*"):
        unused.unlink()
    for entry in ("vmlinuz", "vmlinuz.old", "initrd.img", "initrd.img.old"):
        if (root / entry).is_symlink():
            (root / entry).unlink()
    for leftover in (root / "boot").iterdir():
        if leftover.name.startswith(("System.map-", "config-")):
            leftover.unlink()
    for sub in ("var/cache/apt/archives", "var/lib/apt/lists", "var/cache/apt"):
        for entry in (root / sub).glob("*"):
            if entry.is_file() and entry.name != "lock":
                entry.unlink()
    return vmlinuz, initrd


def _record_os(root: Path, stem: Path) -> None:
    """Copy the guest's os-release to ``<stem>.os-release`` (what doctor and the logs name)."""
    source = root / "usr/lib/os-release"
    if (root / "etc/os-release").is_file() and not (root / "etc/os-release").is_symlink():
        source = root / "etc/os-release"
    target = stem.with_name(stem.name + ".os-release")
    target.write_bytes(source.read_bytes())
    target.chmod(0o644)


def _make_filesystem(root: Path, raw: Path, progress: Progress) -> None:
    """Fill a sparse raw file with an ext4 filesystem holding ``root`` (no loop mount)."""
    used = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            used += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    size_mib = int(used * 1.25 / 2**20) + HEADROOM_MIB
    with open(raw, "wb") as f:
        f.truncate(size_mib * 2**20)
    run_step(["mkfs.ext4", "-q", "-F", "-L", "sandbox-root", "-m", "1", "-E", "root_owner=0:0",
              "-d", str(root), str(raw)], step="mkfs.ext4", timeout=600, progress=progress)


def _link_stable(directory: Path, stem: str) -> None:
    """Point ``debian-guest.{qcow2,vmlinuz,initrd}`` at ``<stem>.*`` (atomic replace)."""
    for suffix in SUFFIXES:
        link = directory / f"{STABLE_NAME}{suffix}"
        tmp = directory / f".{STABLE_NAME}{suffix}.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(f"{stem}{suffix}")
        os.replace(tmp, link)
