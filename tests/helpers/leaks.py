"""Find and remove anything labelled as sandbox-kernels' own: containers, domains, state dirs."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

STATE_DIRS = [Path("/tmp/sandbox-kernels-test")]


def _docker_containers() -> list[str]:
    if not shutil.which("docker"):
        return []
    out = subprocess.run(
        ["docker", "ps", "-aq", "--filter", "label=sandbox-kernels.kernel-id"],
        capture_output=True, text=True, timeout=30,
    )
    return out.stdout.split() if out.returncode == 0 else []


def _domains() -> list[str]:
    if not shutil.which("virsh"):
        return []
    out = subprocess.run(
        ["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
        capture_output=True, text=True, timeout=30,
    )
    return [n for n in out.stdout.split() if n.startswith("sandbox-kernels-")]


def _state_entries() -> list[str]:
    found = []
    for root in STATE_DIRS:
        if root.is_dir():
            found += [str(p) for p in root.iterdir()]
    return found


def _pods() -> list[str]:
    kubeconfig = os.environ.get("SANDBOX_KERNELS_TEST_KUBECONFIG")
    if not (kubeconfig and shutil.which("kubectl")):
        return []
    out = subprocess.run(
        ["kubectl", "--kubeconfig", kubeconfig, "get", "pods", "-A", "-l", "sandbox-kernels/kernel-id",
         "-o", "name"], capture_output=True, text=True, timeout=30,
    )
    return out.stdout.split() if out.returncode == 0 else []


def find_leaks() -> dict[str, list[str]]:
    """Everything of ours that exists now, by kind."""
    return {
        "containers": _docker_containers(),
        "domains": _domains(),
        "state": _state_entries(),
        "pods": _pods(),
    }


def remove_leaks(leaks: dict[str, list[str]]) -> None:
    """Best-effort removal so one leak does not break later runs."""
    for cid in leaks.get("containers", []):
        subprocess.run(["docker", "rm", "-f", cid], capture_output=True, timeout=60)
    for dom in leaks.get("domains", []):
        subprocess.run(["virsh", "-c", "qemu:///system", "destroy", dom], capture_output=True, timeout=60)
        subprocess.run(["virsh", "-c", "qemu:///system", "undefine", dom, "--snapshots-metadata"],
                       capture_output=True, timeout=60)
    for path in leaks.get("state", []):
        shutil.rmtree(path, ignore_errors=True)
