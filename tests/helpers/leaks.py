"""Find and remove what this test session created: containers, domains, pods, state dirs.

Everything the session starts carries the label ``sandbox-kernels.session=<id>`` (from the
``SANDBOX_KERNELS_SESSION`` variable, inherited by papermill subprocesses too), so a test run
never mistakes another run's sandboxes for its own leaks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from sandbox_kernels.runtimes.docker.dirs import remove_state_dir

SESSION_LABEL = "sandbox-kernels.session"


def _session() -> str:
    return os.environ["SANDBOX_KERNELS_SESSION"]


def _docker_containers() -> list[str]:
    if not shutil.which("docker"):
        return []
    out = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label={SESSION_LABEL}={_session()}"],
        capture_output=True, text=True, timeout=30,
    )
    return out.stdout.split() if out.returncode == 0 else []


def _docker_images() -> list[str]:
    if not shutil.which("docker"):
        return []
    out = subprocess.run(
        ["docker", "images", "-q", "--filter", f"label={SESSION_LABEL}={_session()}"],
        capture_output=True, text=True, timeout=30,
    )
    return sorted(set(out.stdout.split())) if out.returncode == 0 else []


def _domains() -> list[str]:
    try:
        from sandbox_kernels.errors import SandboxError
        from sandbox_kernels.runtimes.vm.libvirt_conn import LibvirtHost
    except ImportError:
        return []
    try:
        with LibvirtHost() as host:
            return [n for n in host.list_domains() if host.labels(n).get(SESSION_LABEL) == _session()]
    except SandboxError:
        return []


def _state_entries() -> list[str]:
    root = Path(os.environ["SANDBOX_KERNELS_STATE_DIR"])
    return [str(p) for p in root.iterdir()] if root.is_dir() else []


def _pods(kind: str = "pods") -> list[str]:
    """Kernel objects of ``kind`` (pods, networkpolicies) in the test cluster, as namespace/name."""
    kubeconfig = os.environ.get("SANDBOX_KERNELS_TEST_KUBECONFIG")
    if not (kubeconfig and shutil.which("kubectl")):
        return []
    out = subprocess.run(
        ["kubectl", "--kubeconfig", kubeconfig, "get", kind, "-A", "-l", "sandbox-kernels/kernel-id",
         "-o", "custom-columns=NS:.metadata.namespace,NAME:.metadata.name", "--no-headers"],
        capture_output=True, text=True, timeout=30,
    )
    rows = [line.split() for line in out.stdout.splitlines()] if out.returncode == 0 else []
    return [f"{row[0]}/{row[1]}" for row in rows if len(row) == 2]


def _passt() -> list[str]:
    """passt processes (outbound NICs of VMs) of this session's kernels, as "pid kernel-id"."""
    try:
        from sandbox_kernels.runtimes.vm.outbound import leftover_processes
    except ImportError:
        return []
    root = os.environ["SANDBOX_KERNELS_STATE_DIR"].encode()
    found = []
    for pid, kernel_id in leftover_processes():
        try:  # its log is in the kernel's state directory, under this session's root
            if root + b"/" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(f"{pid} {kernel_id}")
        except OSError:
            pass
    return found


def find_leaks() -> dict[str, list[str]]:
    """Everything of this session's that exists now, by kind."""
    return {
        "containers": _docker_containers(),
        "snapshot images": _docker_images(),
        "domains": _domains(),
        "state": _state_entries(),
        "passt": _passt(),
        "pods": _pods(),
        "network policies": _pods("networkpolicies"),
        "ipc mounts": _ipc_mounts(),
    }


def _ipc_mounts() -> list[str]:
    """This session's Docker kernels' ipc/ tmpfs mounts (root servers), under its state dir."""
    root = os.path.realpath(os.environ["SANDBOX_KERNELS_STATE_DIR"]).rstrip("/") + "/"
    with open("/proc/self/mountinfo") as f:
        return sorted(point for point in (line.split()[4] for line in f if " sandbox-kernels-ipc " in line)
                      if point.startswith(root))


def remove_leaks(leaks: dict[str, list[str]]) -> None:
    """Best-effort removal so one leak does not break later runs."""
    for cid in leaks.get("containers", []):
        subprocess.run(["docker", "rm", "-f", cid], capture_output=True, timeout=60)
    for image in leaks.get("snapshot images", []):
        subprocess.run(["docker", "rmi", "-f", image], capture_output=True, timeout=60)
    for dom in leaks.get("domains", []):
        subprocess.run(["virsh", "-c", "qemu:///system", "destroy", dom], capture_output=True, timeout=60)
        subprocess.run(["virsh", "-c", "qemu:///system", "undefine", dom, "--snapshots-metadata"],
                       capture_output=True, timeout=60)
    for point in leaks.get("ipc mounts", []):
        subprocess.run(["umount", "--lazy", point], capture_output=True, timeout=30)
    for path in leaks.get("state", []):
        remove_state_dir(Path(path))  # a Docker kernel's ipc/ tmpfs too
    for entry in leaks.get("passt", []):
        from sandbox_kernels.runtimes.vm.outbound import stop_process

        pid, kernel_id = entry.split(" ", 1)
        stop_process(int(pid), kernel_id)
    for kind, key in (("pods", "pods"), ("networkpolicies", "network policies")):
        for item in leaks.get(key, []):
            namespace, _, name = item.partition("/")
            subprocess.run(["kubectl", "--kubeconfig", os.environ.get("SANDBOX_KERNELS_TEST_KUBECONFIG", ""),
                            "-n", namespace, "delete", kind, name, "--wait=false"],
                           capture_output=True, timeout=60)
