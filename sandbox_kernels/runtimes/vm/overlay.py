"""Per-kernel disk images: a qcow2 overlay on the shared base image, and a workspace disk.

Each sandbox writes only to its own overlay (``qemu-img create -f qcow2 -F qcow2 -b <base>``);
the base image is never modified. The overlay names the *resolved* base path, so replacing
the ``debian-guest.qcow2`` symlink with a newer build cannot change a running sandbox's disk.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from ...errors import SandboxConfigError, SandboxError, SandboxNotFound, SandboxUnavailable
from ...progress import run_step

#: Free space a new overlay directory must have (the overlay grows as the guest writes).
DEFAULT_MIN_FREE = 1024**3
_IMAGES_SETTING = "NIXOS_EPHEMERAL_VM_IMAGES_DIR"


def image_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``qemu-img info --output=json`` of an image (works while a VM uses it).

    Raises:
        SandboxNotFound: the file does not exist.
        SandboxUnavailable: qemu-img is not installed.
        SandboxError: the file is unreadable or not a valid image (the message has qemu-img's).
    """
    image = Path(path)
    if not image.exists():
        raise SandboxNotFound(
            f"VM image {image} does not exist. Build the default one with "
            "`sandbox-kernels image build vm`, or point NIXOS_SANDBOX_BASE_IMAGE at a qcow2."
        )
    if not shutil.which("qemu-img"):
        raise SandboxUnavailable("qemu-img is missing: `apt-get install qemu-utils`.")
    try:
        proc = subprocess.run(["qemu-img", "info", "--output=json", "--force-share", str(image)],
                              capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired as e:
        raise SandboxError(f"qemu-img info {image} did not answer within 60 s.") from e
    if proc.returncode != 0:
        raise SandboxError(
            f"VM image {image} is unreadable or corrupt: {proc.stderr.strip() or proc.stdout}. "
            "Rebuild it (`sandbox-kernels image build vm --force`) or fix NIXOS_SANDBOX_BASE_IMAGE."
        )
    info: dict[str, Any] = json.loads(proc.stdout)
    return info


def check_base_image(path: str | os.PathLike[str]) -> Path:
    """Check that ``path`` is a readable qcow2 image; return its resolved path.

    Raises:
        SandboxNotFound: missing file.
        SandboxConfigError: not qcow2 (a raw or other format cannot back an overlay here).
        SandboxError: unreadable or corrupt.
    """
    resolved = Path(path).resolve()
    info = image_info(resolved)
    if info.get("format") != "qcow2":
        raise SandboxConfigError(
            f"VM image {path} is {info.get('format')!r}, not qcow2: convert it with "
            f"`qemu-img convert -O qcow2 {path} image.qcow2`."
        )
    if info.get("format-specific", {}).get("data", {}).get("corrupt"):
        raise SandboxError(f"VM image {path} is marked corrupt: run `qemu-img check -r all` on it "
                           "or rebuild it.")
    return resolved


def check_free_space(directory: Path, needed: int = DEFAULT_MIN_FREE) -> None:
    """Raise if ``directory``'s filesystem has less than ``needed`` bytes free.

    Raises:
        SandboxUnavailable: not enough space; the message names the setting to move it.
    """
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise SandboxUnavailable(
            f"only {free / 2**20:.0f} MiB free in {directory}, {needed / 2**20:.0f} MiB needed "
            f"for a VM overlay. Free some space or set {_IMAGES_SETTING} to a directory on a "
            "larger filesystem."
        )


def private_dir(directory: str | os.PathLike[str]) -> Path:
    """Create ``directory`` (and parents) with mode 0700, or tighten an existing one."""
    path = Path(directory)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def create_overlay(base: str | os.PathLike[str], directory: str | os.PathLike[str],
                   name: str = "root.qcow2", min_free: int = DEFAULT_MIN_FREE) -> Path:
    """Create the qcow2 overlay ``<directory>/<name>`` backed by ``base``.

    Args:
        base: the base qcow2 (a symlink is resolved first).
        directory: the per-kernel image directory (created 0700).
        name: the overlay file name.
        min_free: bytes that must be free in ``directory``.

    Returns:
        The overlay path.

    Raises:
        SandboxNotFound / SandboxConfigError / SandboxError: a missing, non-qcow2 or corrupt
            base image (see :func:`check_base_image`).
        SandboxUnavailable: not enough free space, or qemu-img missing.
    """
    resolved = check_base_image(base)
    target_dir = private_dir(directory)
    check_free_space(target_dir, min_free)
    overlay = target_dir / _check_file_name(name)
    run_step(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(resolved),
              str(overlay)], step="create the VM overlay", timeout=60)
    os.chmod(overlay, 0o600)
    return overlay


def create_workspace(directory: str | os.PathLike[str], size: int,
                     name: str = "workspace.qcow2") -> Path:
    """Create an empty qcow2 workspace disk of ``size`` bytes (the guest formats it ext4).

    An existing workspace is kept (it holds the user's files).

    Raises:
        SandboxUnavailable: not enough free space for the minimum, or qemu-img missing.
        SandboxError: qemu-img failed.
    """
    target_dir = private_dir(directory)
    workspace = target_dir / _check_file_name(name)
    if workspace.exists():
        image_info(workspace)
        return workspace
    check_free_space(target_dir)
    run_step(["qemu-img", "create", "-q", "-f", "qcow2", str(workspace), str(int(size))],
             step="create the workspace disk", timeout=60)
    os.chmod(workspace, 0o600)
    return workspace


def remove_images(directory: str | os.PathLike[str]) -> None:
    """Remove a per-kernel image directory and everything in it (idempotent)."""
    shutil.rmtree(directory, ignore_errors=True)


def _check_file_name(name: str) -> str:
    if not name or "/" in name or name.startswith(".") or "\0" in name:
        raise SandboxConfigError(f"image file name {name!r} must be a plain file name.")
    return name
