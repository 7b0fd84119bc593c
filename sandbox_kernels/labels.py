"""Names and labels that mark what sandbox-kernels creates, so it can be found and reaped.

Docker labels use dots (``sandbox-kernels.kernel-id``), Kubernetes labels a slash
(``sandbox-kernels/kernel-id``), libvirt domains are named ``sandbox-kernels-<kernel id>``.
The owner labels let ``sandbox-kernels reap`` tell a live server's sandbox from an orphan.
"""

from __future__ import annotations

import os
import socket

PREFIX = "sandbox-kernels"
KERNEL_ID = f"{PREFIX}.kernel-id"
RUNTIME = f"{PREFIX}.runtime"
OWNER_PID = f"{PREFIX}.owner-pid"
OWNER_HOST = f"{PREFIX}.owner-host"
SESSION = f"{PREFIX}.session"
DOMAIN_PREFIX = f"{PREFIX}-"


def owner_labels(kernel_id: str, runtime: str) -> dict[str, str]:
    """Docker-style labels for a kernel's sandbox, naming the process that owns it."""
    found = {
        KERNEL_ID: kernel_id,
        RUNTIME: runtime,
        OWNER_PID: str(os.getpid()),
        OWNER_HOST: socket.gethostname(),
    }
    session = os.environ.get("SANDBOX_KERNELS_SESSION", "")
    if session:  # a test run (or any caller) marks its sandboxes to find them again
        found[SESSION] = session
    return found


def owner_alive(labels: dict[str, str]) -> bool:
    """Whether the process named by ``labels`` still runs on this host."""
    if labels.get(OWNER_HOST) != socket.gethostname():
        return True  # another host's: never ours to judge
    try:
        pid = int(labels.get(OWNER_PID, "0"))
    except ValueError:
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
