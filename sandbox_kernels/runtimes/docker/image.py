"""The Docker base image, imported from the debootstrap root filesystem (no registry needed)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from ...cache import recipe_hash
from ...errors import SandboxError
from ...progress import Progress
from .provisioner import DEFAULT_IMAGE
from .engine import DockerEngine
from ...images.rootfs import base_recipe, ensure_base_rootfs

REPOSITORY = DEFAULT_IMAGE.split(":")[0]
CHANGES = [
    "USER executor",
    "WORKDIR /home/executor",
    "ENV PATH=/usr/local/bin:/usr/bin:/bin",
    "ENV LANG=C.UTF-8",
    'CMD ["python3"]',
]


def image_tag() -> str:
    """The tag of the image the current recipe produces."""
    return f"{REPOSITORY}:{recipe_hash({'rootfs': base_recipe(), 'changes': CHANGES})}"


def build_docker_image(force: bool = False) -> str:
    """Build (or reuse) the base image and tag it ``sandbox-kernels/python:latest``.

    Returns:
        The versioned tag, e.g. ``sandbox-kernels/python:1a2b3c...``.

    Raises:
        SandboxUnavailable: no Docker engine, not root, or debootstrap missing.
        SandboxError: a step failed.
    """
    engine = DockerEngine(timeout=600)
    api = engine.client.api
    tag = image_tag()
    progress = Progress("image docker", 5)
    try:
        if not force and api.images(name=tag):
            api.tag(tag, REPOSITORY, "latest")
            progress.finish(f"{tag} is up to date (cached)")
            return tag
        root = ensure_base_rootfs(progress)
        progress.step("docker import")
        _import(api, root, tag)
        api.tag(tag, REPOSITORY, "latest")
        progress.finish(f"built {tag} (also tagged latest)")
        return tag
    finally:
        engine.close()


def _import(api: object, root: Path, tag: str) -> None:
    repo, _, version = tag.partition(":")
    tar = subprocess.Popen(
        ["tar", "-C", str(root), "--numeric-owner", "--exclude=./.sandbox-kernels-complete",
         "-cf", "-", "."], stdout=subprocess.PIPE,
    )
    try:
        api.import_image(src=tar.stdout, repository=repo, tag=version, changes=CHANGES,  # type: ignore[attr-defined]
                         stream_src=True)
    finally:
        assert tar.stdout is not None
        tar.stdout.close()
        if tar.wait() != 0:
            raise SandboxError(f"tar of {root} failed (exit {tar.returncode})")
