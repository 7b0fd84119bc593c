"""The settings every sandbox runtime shares.

Set them as ``c.SandboxProvisioner.<name>`` in a Jupyter config (or per runtime class), in a
kernelspec's ``metadata.kernel_provisioner.config`` (which may only narrow what the admin
allows, see :mod:`sandbox_kernels.policy`), or through the environment variable each names.
"""

from __future__ import annotations

from traitlets import Float, Int, List, Unicode, default
from traitlets.config import LoggingConfigurable

from ..settings import default_state_root, env_default
from ..snapshots.quota import ByteSize

#: Variables from the server's environment that reach the kernel unless configured otherwise.
_DEFAULT_PASSTHROUGH = ["JPY_SESSION_NAME"]


class SharedSettings(LoggingConfigurable):
    """Launch timeout, environment pass-through, state directory and snapshot quotas."""

    launch_timeout = Float(
        120.0,
        config=True,
        help="Seconds allowed for the sandbox to start and the kernel in it to come up. "
        "Bounds the whole of launch_kernel, which papermill's --start-timeout does not. "
        "Env: SANDBOX_KERNELS_LAUNCH_TIMEOUT.",
    )
    _launch_timeout_default = env_default("launch_timeout", "SANDBOX_KERNELS_LAUNCH_TIMEOUT")

    env_passthrough = List(
        Unicode(),
        default_value=_DEFAULT_PASSTHROUGH,
        config=True,
        help="Names of variables from the Jupyter server's environment passed into the sandbox. "
        "The kernelspec's own 'env' is always passed; nothing else from the host leaks in.",
    ).tag(widen="subset")

    pool_size = Int(
        0,
        min=0,
        max=64,
        config=True,
        help="Sandboxes of this kernelspec's configuration kept ready, each with a kernel "
        "already running, shared by every process of this user through the pool agent "
        "(`sandbox-kernels pool`); a start claims one instead of creating a sandbox. 0 (the "
        "default) turns the pool off: each pooled sandbox holds memory (and, for VMs, one of "
        "the NIXOS_MAX_CONCURRENT_VMS slots) while nobody uses it. Runtimes with pools: the VM "
        "(env NIXOS_VM_POOL_SIZE) and Docker/gVisor (env SANDBOX_DOCKER_POOL_SIZE).",
    ).tag(widen="higher")

    pool_idle_timeout = Float(
        600.0,
        min=1.0,
        config=True,
        help="Seconds a warm pool lives without a kernel start asking for its configuration; "
        "then its sandboxes are removed (the next start refills it). "
        "Env: SANDBOX_KERNELS_POOL_IDLE_TIMEOUT.",
    ).tag(widen="higher")
    _pool_idle_timeout_default = env_default("pool_idle_timeout", "SANDBOX_KERNELS_POOL_IDLE_TIMEOUT")

    state_root = Unicode(
        config=True,
        help="Directory for per-kernel state (ipc sockets, keys, logs, overlays); created 0700. "
        "Env: SANDBOX_KERNELS_STATE_DIR. Default: $XDG_RUNTIME_DIR/sandbox-kernels or "
        "/tmp/sandbox-kernels-<uid>.",
    ).tag(widen="admin")

    @default("state_root")
    def _state_root_default(self) -> str:
        return default_state_root()

    snapshot_max_count = Int(
        10,
        min=0,
        config=True,
        help="Snapshots one kernel may hold, kept ones included; taking one more fails with "
        "409 until one is deleted. Ten checkpoints cover a notebook session; each VM memory "
        "snapshot holds the guest's memory. Env: SANDBOX_KERNELS_SNAPSHOT_MAX_COUNT.",
    ).tag(widen="higher")
    _snapshot_max_count_default = env_default("snapshot_max_count", "SANDBOX_KERNELS_SNAPSHOT_MAX_COUNT")

    snapshot_max_bytes = ByteSize(
        10 * 1024**3,
        min=0,
        config=True,
        help="Bytes one kernel's snapshots may use together, kept ones included (a number or "
        "a size such as '10g'); a snapshot that would go over is removed again and fails with "
        "409. Counts what a runtime reports per snapshot (Docker: the committed layer). "
        "Env: SANDBOX_KERNELS_SNAPSHOT_MAX_BYTES.",
    ).tag(widen="higher")
    _snapshot_max_bytes_default = env_default("snapshot_max_bytes", "SANDBOX_KERNELS_SNAPSHOT_MAX_BYTES")
