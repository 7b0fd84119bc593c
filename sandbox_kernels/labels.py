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
#: On a warm-pool member's sandbox: its owner is whoever claimed it (see :func:`owner_alive`).
POOLED = f"{PREFIX}.pooled"
#: On a warm-pool member's sandbox: the state root whose agent made it (where its claim is
#: recorded), so a ``reap`` run with another state root judges it right.
STATE_ROOT = f"{PREFIX}.state-root"
DOMAIN_PREFIX = f"{PREFIX}-"


def owner_labels(kernel_id: str, runtime: str, pooled: bool = False, state_root: str = "") -> dict[str, str]:
    """Docker-style labels for a kernel's sandbox, naming the process that owns it (the pool
    agent, for a pooled sandbox, until a kernel claims it)."""
    found = {
        KERNEL_ID: kernel_id,
        RUNTIME: runtime,
        OWNER_PID: str(os.getpid()),
        OWNER_HOST: socket.gethostname(),
    }
    session = os.environ.get("SANDBOX_KERNELS_SESSION", "")
    if session:  # a test run (or any caller) marks its sandboxes to find them again
        found[SESSION] = session
    if pooled:
        found[POOLED] = "1"
        if state_root:
            found[STATE_ROOT] = state_root
    return found


#: In a claimed pool member's (host-private) state directory: the pid of the claiming process.
CLAIMED_BY = "claimed-by"


def owner_alive(labels: dict[str, str], state_root: str | None = None) -> bool:
    """Whether the process named by ``labels`` still runs on this host.

    A pooled sandbox (:data:`POOLED`) belongs to the pool agent that made it until a kernel
    claims it; from then on to the claiming process, whose pid is in the :data:`CLAIMED_BY`
    file of its state directory under its own state root (:data:`STATE_ROOT`), else under
    ``state_root``.
    """
    if labels.get(OWNER_HOST) != socket.gethostname():
        return True  # another host's: never ours to judge
    try:
        pid = int(labels.get(OWNER_PID, "0"))
        root = labels.get(STATE_ROOT) or state_root
        if labels.get(POOLED) and root:
            claimed = claimed_by(os.path.join(root, labels.get(KERNEL_ID, "")))
            pid = claimed if claimed is not None else pid
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


def claimed_by(state_dir: str) -> int | None:
    """The pid recorded in ``state_dir``'s :data:`CLAIMED_BY` file (a host-private
    directory), or None if there is none."""
    try:
        with open(os.path.join(state_dir, CLAIMED_BY), "rb") as f:
            return int(f.read(32).decode().strip() or "0")
    except (OSError, ValueError, UnicodeDecodeError):
        return None
