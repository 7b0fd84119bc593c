"""The Docker runtime's leftovers: containers whose owner is gone (``reap``), and what a test
session left (containers, snapshot images, ``ipc/`` tmpfs mounts)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from ... import labels
from ...errors import SandboxError
from ...reap import Orphan, OrphanFinder

if TYPE_CHECKING:
    from .engine import DockerEngine


class DockerOrphans(OrphanFinder):
    """Containers labelled as ours; the engine named by the Docker client's environment."""

    def _engine(self) -> DockerEngine:
        from .engine import DockerEngine

        return DockerEngine(timeout=10)

    def orphans(self) -> list[Orphan]:
        """Containers whose owner process (on this host) is gone."""
        try:
            engine = self._engine()
            rows = engine.find()
        except SandboxError:
            return []
        found = []
        for row in rows:
            row_labels = row.get("Labels") or {}
            if not labels.owner_alive(row_labels, self.settings.state_root):
                cid = row["Id"]
                found.append(Orphan("container", f"{row['Names'][0].lstrip('/')} ({cid[:12]})",
                                    lambda cid=cid: engine.remove(cid), row_labels.get(labels.KERNEL_ID, "")))
        return found

    def existing(self) -> set[str]:
        """Kernel ids of every container labelled as ours."""
        try:
            rows = self._engine().find()
        except SandboxError:
            return set()
        return {(row.get("Labels") or {}).get(labels.KERNEL_ID, "") for row in rows}

    def release_directory(self, path: Path) -> None:
        """Unmount a Docker kernel's ``ipc/`` tmpfs (root servers) below ``path``."""
        from .dirs import mounts_below

        for point in mounts_below(path):
            subprocess.run(["umount", "--lazy", point], capture_output=True, timeout=30)

    def leaks(self, session: str) -> dict[str, list[str]]:
        """The session's containers and snapshot images, and its kernels' ``ipc/`` mounts."""
        return {"containers": _docker("ps", "-aq", session),
                "snapshot images": sorted(set(_docker("images", "-q", session))),
                "ipc mounts": self._ipc_mounts()}

    def remove_leaks(self, leaks: dict[str, list[str]]) -> None:
        """``docker rm -f``, ``docker rmi -f``, ``umount --lazy``."""
        for cid in leaks.get("containers", []):
            subprocess.run(["docker", "rm", "-f", cid], capture_output=True, timeout=60)
        for image in leaks.get("snapshot images", []):
            subprocess.run(["docker", "rmi", "-f", image], capture_output=True, timeout=60)
        for point in leaks.get("ipc mounts", []):
            subprocess.run(["umount", "--lazy", point], capture_output=True, timeout=30)

    def _ipc_mounts(self) -> list[str]:
        """Docker kernels' ipc/ tmpfs mounts (root servers) under the state root."""
        root = os.path.realpath(self.settings.state_root).rstrip("/") + "/"
        with open("/proc/self/mountinfo") as f:
            return sorted(point for point in (line.split()[4] for line in f if " sandbox-kernels-ipc " in line)
                          if point.startswith(root))


def _docker(command: str, flag: str, session: str) -> list[str]:
    if not shutil.which("docker"):
        return []
    out = subprocess.run(["docker", command, flag, "--filter", f"label={labels.SESSION}={session}"],
                         capture_output=True, text=True, timeout=30)
    return out.stdout.split() if out.returncode == 0 else []
