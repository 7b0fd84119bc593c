"""Which directories VM images may come from.

A kernelspec is a file anyone with a Jupyter data directory can write. Without a policy its
``base_image`` (or ``guest_kernel``) could name any file the server can read, and QEMU would be
given access to it, or a qcow2 whose backing file is such a file. Images, guest kernels and
every backing file must therefore live below an allowed directory.
"""

from __future__ import annotations

import os
from pathlib import Path

from ...cache import cache_dir
from ...errors import SandboxConfigError
from .overlay import image_info

#: Where an administrator may install images without configuring anything.
SYSTEM_IMAGE_DIR = "/var/lib/sandbox-kernels/images"
#: The environment variable the ``image_dirs`` setting's default reads (named in errors).
ENV = "SANDBOX_KERNELS_VM_IMAGE_DIRS"
_MAX_CHAIN = 16


def default_dirs(base_image: str | None = None) -> list[str]:
    """Where images may come from when nothing is configured: the image cache,
    /var/lib/sandbox-kernels/images and the directory of ``base_image`` (the provisioner's
    ``image_dirs`` trait default passes $NIXOS_SANDBOX_BASE_IMAGE)."""
    dirs = [str(cache_dir() / "vm"), SYSTEM_IMAGE_DIR]
    if base_image:
        dirs.append(str(Path(base_image).parent))
    return dirs


def allowed_dirs(configured: list[str]) -> list[Path]:
    """The allowed directories, resolved: ``configured`` (the ``image_dirs`` setting, whose
    default reads $SANDBOX_KERNELS_VM_IMAGE_DIRS), else :func:`default_dirs`."""
    return [Path(os.path.realpath(d)) for d in (configured or default_dirs())]


def check_path(path: str, setting: str, dirs: list[Path]) -> None:
    """Refuse ``path`` unless it resolves (symlinks followed) below one of ``dirs``.

    Raises:
        SandboxConfigError: names the setting, the path and how to allow it.
    """
    real = Path(os.path.realpath(path))
    if not any(real == d or real.is_relative_to(d) for d in dirs):
        raise SandboxConfigError(
            f"{setting}={path!r} is outside the allowed VM image directories "
            f"({', '.join(map(str, dirs))}). Put the file there, or add its directory to the "
            f"image_dirs setting (or {ENV})."
        )


def check_image(path: str, setting: str, dirs: list[Path]) -> None:
    """Refuse an image outside ``dirs``, or one whose backing chain leaves them.

    Raises:
        SandboxConfigError: as for :func:`check_path`, naming the backing file if that is it.
        SandboxNotFound, SandboxError: the image cannot be read (from ``qemu-img info``).
    """
    check_path(path, setting, dirs)
    current = Path(os.path.realpath(path))
    for _ in range(_MAX_CHAIN):
        info = image_info(current)
        backing = info.get("full-backing-filename") or info.get("backing-filename")
        if not backing:
            return
        backing_path = Path(backing) if os.path.isabs(backing) else current.parent / backing
        check_path(str(backing_path), f"{setting} (backing file of {current.name})", dirs)
        current = Path(os.path.realpath(backing_path))
    raise SandboxConfigError(f"{setting}={path!r} has a backing chain deeper than {_MAX_CHAIN} images.")
