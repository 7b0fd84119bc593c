"""The provisioner base: the kernel lifecycle that every sandbox runtime shares.

:class:`SandboxProvisioner` implements jupyter_client's ``KernelProvisionerBase``. It owns the
connection file, the launch timeout, ``poll``/``wait``/signals, restarts, persistence and
clean-up on every path (failure, Ctrl-C, interpreter exit). A runtime subclass (Docker, libvirt,
Kubernetes, SSH host) fills in the small ``async`` hooks of :mod:`.hooks`.

Lifecycle as driven by ``KernelManager``::

    pre_launch()        -> write the connection file, build the command and environment
    launch_kernel()     -> create_sandbox() (first start or after loss), start_kernel(),
                           wait_ready(); bounded by ``launch_timeout``; tears down on failure
    poll()/wait()       -> kernel_exit_code() (never "dead" while a snapshot is in progress)
    send_signal()       -> signal_kernel()
    cleanup(restart)    -> restart: keep the sandbox; else destroy_sandbox()
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from pathlib import Path
from typing import Any, ClassVar

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning import KernelProvisionerBase
from traitlets import TraitError

from ..errors import SandboxConfigError, SandboxError, SandboxTimeout
from ..settings import check_env, check_name, default_state_root
from ..labels import owner_labels
from ..policy import apply_kernelspec_config
from ..private_dirs import open_private_dir
from ..snapshots.control import ControlServer
from .exit_cleanup import shielded, track, untrack
from .hooks import RuntimeHooks
from .shared_settings import SharedSettings
from .snapshot_hooks import SnapshotHooks
from .start_progress import StartProgress
from ..pool.claim import claim_from_pool
from ..pool.client import Claim

#: Keyword arguments that jupyter_client itself passes to a provisioner's constructor.
_FRAMEWORK_KWARGS = {"kernel_id", "kernel_spec", "parent", "log", "config", "connection_info"}


class SandboxProvisioner(KernelProvisionerBase, SharedSettings, RuntimeHooks, SnapshotHooks):  # type: ignore[misc]
    """Base class of every sandbox provisioner; subclasses implement the runtime hooks.

    The settings every runtime shares are in :class:`~.shared_settings.SharedSettings`; the
    hooks and their defaults in :class:`~.hooks.RuntimeHooks` (the lifecycle) and
    :class:`~.snapshot_hooks.SnapshotHooks` (snapshots).
    """

    #: Short runtime name used in labels, logs and the state directory ("docker", "libvirt").
    runtime: ClassVar[str] = ""
    #: Kernelspec name this runtime ships (for messages).
    kernel_name: ClassVar[str] = ""
    #: Whether this runtime can keep a warm pool (``pool_size``; see :mod:`sandbox_kernels.pool`).
    supports_pool: ClassVar[bool] = False

    def __init__(self, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - _FRAMEWORK_KWARGS - set(self.class_trait_names(config=True)))
        if unknown:
            valid = ", ".join(sorted(self.class_trait_names(config=True)))
            raise SandboxConfigError(
                f"unknown setting(s) {', '.join(map(repr, unknown))} in the kernelspec's "
                f"metadata.kernel_provisioner.config for {type(self).__name__}. "
                f"Valid settings: {valid}."
            )
        # Admin settings first (Jupyter config, the server's environment), then the
        # kernelspec's, which may only narrow what the admin allows (see policy.py).
        framework = {k: v for k, v in kwargs.items() if k in _FRAMEWORK_KWARGS}
        try:
            super().__init__(**framework)
        except TraitError as e:
            raise SandboxConfigError(
                f"invalid setting for {type(self).__name__} in the Jupyter config: {e}"
            ) from e
        apply_kernelspec_config(self, {k: v for k, v in kwargs.items() if k not in framework})
        self._has_process = False
        self._sandbox_ready = False
        self._busy = 0  # snapshot/rollback operations in progress: poll() reports alive
        self._restarting = False  # between cleanup(restart=True) and the next launch
        self._idle = asyncio.Event()
        self._idle.set()
        self._sandbox_env: dict[str, str] = {}
        self._last_cmd: list[str] = []  # the kernel command, for restarts a rollback makes
        self._local_ports: dict[str, int] = {}
        self._state_dir: Path | None = None
        self._control: ControlServer | None = None
        self._progress: StartProgress | None = None
        self._sandbox_id = ""  # a claimed pool member's id (its sandbox's name and labels)
        self._claimed = False  # the next launch finds the kernel already running (pool)
        self._pool_hold: Claim | None = None  # the pool refills once it is released

    # -- settings --------------------------------------------------------------------------

    @property
    def state_dir(self) -> Path:
        """This kernel's private state directory (mode 0700), created on first use."""
        if self._state_dir is None:
            root = Path(self.state_root or default_state_root())
            os.close(open_private_dir(root, "the state directory (state_root)",
                                      "Set SANDBOX_KERNELS_STATE_DIR (or XDG_RUNTIME_DIR) to a "
                                      "directory of this user's."))
            path = root / check_name(self.sandbox_id, "kernel id")
            path.mkdir(mode=0o700, exist_ok=True)
            self._state_dir = path
        return self._state_dir

    @property
    def sandbox_id(self) -> str:
        """The id that names this kernel's sandbox, state directory and labels: the kernel id,
        or a claimed pool member's own id (it was made before the kernel existed)."""
        return self._sandbox_id or self.kernel_id

    @property
    def pool_member(self) -> bool:
        """Whether this provisioner makes a warm-pool member (the pool agent's kernel manager
        says so); a member never claims from a pool and never waits in a queue."""
        return bool(getattr(self.parent, "pool_member", False))

    @property
    def labels(self) -> dict[str, str]:
        """Labels put on everything created for this kernel (kernel id, runtime, owner)."""
        root = str(self.state_dir.parent) if self.pool_member else ""
        return owner_labels(self.sandbox_id, self.runtime, pooled=self.pool_member, state_root=root)

    @property
    def sandbox_name(self) -> str:
        """The name given to this kernel's sandbox: ``sandbox-kernels-<sandbox id>``."""
        return f"sandbox-kernels-{check_name(self.sandbox_id, 'kernel id')}"

    @property
    def start_progress(self) -> StartProgress:
        """Where this kernel's start phases go (the log, and JupyterLab through the server
        extension's sink); runtimes report their own phases on it."""
        if self._progress is None:
            name = getattr(self.parent, "kernel_name", "") or self.kernel_name or self.runtime
            self._progress = StartProgress(self.kernel_id, name, self.runtime, self.log)
        return self._progress

    @property
    def has_state_dir(self) -> bool:
        """Whether this kernel's state directory exists (asking does not create it)."""
        return self._state_dir is not None

    @property
    def local_ports(self) -> dict[str, int]:
        """The client side's ports by name (``"shell_port"``, ...), kept across restarts.

        Empty before the first :meth:`pre_launch`: a runtime's :meth:`configure_transport`
        chooses ports only then.
        """
        return dict(self._local_ports)

    def validate_settings(self) -> None:
        """Check settings whose validity a trait type cannot express (sizes, paths).

        Called from :meth:`pre_launch` before anything is created. Subclasses call ``super()``.

        Raises:
            SandboxConfigError: a setting is invalid; the message names it.
        """
        if self.launch_timeout <= 0:
            raise SandboxConfigError(f"launch_timeout={self.launch_timeout} must be positive.")
        if self.pool_size and not self.supports_pool:
            raise SandboxConfigError(
                f"pool_size={self.pool_size}: the {self.runtime} runtime keeps no warm pool "
                "(the VM and Docker runtimes do); set it to 0.")

    # -- jupyter_client provisioner API ----------------------------------------------------

    @property
    def has_process(self) -> bool:
        """Whether a kernel was launched and not yet cleaned up (read by ``KernelManager``).

        True during a restart too: ``KernelManager.is_alive()`` asks this first, and clients
        waiting for the restarted kernel must not conclude that it died.
        """
        return self._has_process or self._restarting

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        """Validate settings, write the connection file and build the command and env.

        Called from ``KernelManager.pre_start_kernel()``.
        """
        self.start_progress.begin()
        try:
            self.validate_settings()
            km = self.parent
            if self.pool_size and not self.pool_member and not self._local_ports and not self._sandbox_ready:
                await claim_from_pool(self, km, kwargs.get("env", os.environ),
                                      kwargs.get("extra_arguments", []))
        except SandboxError as e:
            self.start_progress.phase("failed", str(e))
            raise
        self.configure_transport(km)
        env = kwargs.get("env", os.environ)
        extra_arguments = kwargs.pop("extra_arguments", [])
        if self._local_ports:
            # A restart (even with newports=True, as the restarter asks early on) keeps the
            # ports: they are ours (tunnel listeners, ipc paths), and clients stay connected.
            for name, port in self._local_ports.items():
                setattr(km, name, port)
        km.write_connection_file(jupyter_session=env.get("JPY_SESSION_NAME", ""))
        self.connection_info = km.get_connection_info()
        self._local_ports = {f"{ch}_port": int(self.connection_info[f"{ch}_port"])
                             for ch in ("shell", "iopub", "stdin", "control", "hb")}
        cmd = km.format_kernel_cmd(extra_arguments=extra_arguments)
        # jupyter_client swaps "python3" for the server's own interpreter: undo that, the
        # command runs inside the sandbox.
        cmd[0] = self.kernel_spec.argv[0]
        host_file = km.connection_file
        cmd = [self.sandbox_connection_file() if arg == host_file else arg for arg in cmd]
        kwargs = await super().pre_launch(cmd=cmd, **kwargs)
        self._sandbox_env = self.kernel_env(kwargs["env"])
        return kwargs

    def kernel_env(self, full_env: dict[str, str]) -> dict[str, str]:
        """What of ``full_env`` (a start's environment) reaches the kernel: the kernelspec's
        env and ``env_passthrough``, checked."""
        wanted = set(self.kernel_spec.env) | set(self.env_passthrough)
        env = {k: v for k, v in full_env.items() if k in wanted}
        env.setdefault("PYTHONUNBUFFERED", "1")
        return check_env(env)

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        """Start the sandbox if needed and the kernel in it, within ``launch_timeout``.

        Called from ``KernelManager._async_launch_kernel()``. On any failure, including
        cancellation, everything created for this kernel is removed before the error is raised.

        Raises:
            SandboxTimeout: the sandbox or kernel did not come up within ``launch_timeout``.
            SandboxError: the runtime failed; the message says what to do.
        """
        track(self)
        task = asyncio.ensure_future(self._launch(cmd))
        try:
            done, _ = await asyncio.wait({task}, timeout=self.launch_timeout)
            if not done:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
                detail = await self._safe_diagnostics()
                raise SandboxTimeout(
                    f"{self.kernel_name or self.runtime} kernel did not start within "
                    f"launch_timeout={self.launch_timeout:g} s. Raise the setting (kernelspec "
                    f"config or SANDBOX_KERNELS_LAUNCH_TIMEOUT) if the machine is slow.{detail}"
                )
            task.result()
            self.start_progress.phase("ready", "the kernel is ready")
            self._has_process = True
            self._restarting = False
            if self._control is None:
                self._control = ControlServer(self)
                await self._control.start()
        except BaseException as e:
            if not task.done():
                task.cancel()
            self.start_progress.phase("failed", str(e) or type(e).__name__)
            await shielded(self.teardown())
            raise
        return self.connection_info

    async def _launch(self, cmd: list[str]) -> None:
        progress = self.start_progress
        self._last_cmd = cmd
        if self._claimed:  # a pool member's kernel runs already: connect to it
            self._claimed = False
            progress.phase("connecting", "connecting to the kernel claimed from the warm pool")
            try:
                await self.connect_claimed()
            finally:
                self._release_pool_hold()
            return
        if not self._sandbox_ready:
            progress.phase("creating", f"creating the {self.runtime} sandbox {self.sandbox_name}")
            await self.create_sandbox()
            self._sandbox_ready = True
        progress.phase("starting", "starting the kernel")
        await self.start_kernel(cmd, self._sandbox_env)
        progress.phase("connecting", "connecting to the kernel")
        await self.wait_ready()

    async def relaunch_kernel(self) -> None:
        """Start the kernel again in the ready sandbox, with the last command and environment,
        and wait until it listens.

        Called by runtimes whose rollback replaces the kernel process (Docker, libvirt), with
        the kernel marked :meth:`busy`.
        """
        await self.start_kernel(self._last_cmd, self._sandbox_env)
        await self.wait_ready()

    async def poll(self) -> int | None:
        """Return None while the kernel runs, else its exit code (-1 when the sandbox is gone).

        Called from ``KernelManager.is_alive()`` and the restarter. While a snapshot or
        rollback is in progress the kernel is reported alive.
        """
        if self._restarting:
            return None
        if not self._has_process:
            return 0
        if self._busy:
            return None
        try:
            return await self.kernel_exit_code()
        except SandboxError as e:
            self.log.warning("Kernel %s: sandbox check failed, reporting dead: %s", self.kernel_id, e)
            return -1

    async def wait(self) -> int | None:
        """Wait until the kernel has exited; called from ``KernelManager.finish_shutdown()``."""
        while True:
            code = await self.poll()
            if code is not None:
                return code
            await asyncio.sleep(0.1)

    async def send_signal(self, signum: int) -> None:
        """Send ``signum`` to the kernel process; called from ``KernelManager.signal_kernel()``."""
        if signum == 0 or not self._has_process:
            return
        await self.idle()
        try:
            await self.signal_kernel(signum)
        except SandboxError as e:
            # Like a local process that already exited: the caller (often shutdown) goes on.
            self.log.warning("Kernel %s: could not deliver signal %d: %s", self.kernel_id, signum, e)

    async def kill(self, restart: bool = False) -> None:
        """Kill the kernel process; called from ``KernelManager._kill_kernel()``."""
        if self._has_process:
            with contextlib.suppress(SandboxError):
                await self.signal_kernel(signal.SIGKILL)

    async def terminate(self, restart: bool = False) -> None:
        """Terminate the kernel process; called from ``KernelManager._send_kernel_sigterm()``."""
        if self._has_process:
            with contextlib.suppress(SandboxError):
                await self.signal_kernel(signal.SIGTERM)

    async def cleanup(self, restart: bool = False) -> None:
        """Release resources; called from ``KernelManager.cleanup_resources()``.

        On restart the sandbox is kept (the next ``launch_kernel`` starts a fresh kernel in it)
        unless :meth:`keep_sandbox_on_restart` says otherwise. Otherwise everything goes.
        """
        if restart and self._sandbox_ready and await self.keep_sandbox_on_restart():
            # The sandbox stays and a new kernel follows at once: keep reporting a live
            # kernel meanwhile, or clients waiting for it would conclude it died.
            self._restarting = True
            await self.stop_kernel()
            return
        self._has_process = False
        await shielded(self.teardown())
        if restart:
            # A new sandbox follows at once (the old one is gone, or fresh ones are asked
            # for): as above, clients must not conclude the kernel died meanwhile.
            self._restarting = True

    async def get_provisioner_info(self) -> dict[str, Any]:
        """Add the runtime's state so another server process can re-attach (see ``reap``)."""
        info = await super().get_provisioner_info()
        info.update(
            runtime=self.runtime,
            sandbox_name=self.sandbox_name,
            sandbox_id=self.sandbox_id,
            state_dir=str(self.state_dir),
            sandbox_state=self.runtime_state(),
        )
        return info

    async def load_provisioner_info(self, provisioner_info: dict[str, Any]) -> None:
        """Re-attach to a sandbox described by :meth:`get_provisioner_info`."""
        await super().load_provisioner_info(provisioner_info)
        self._sandbox_id = provisioner_info.get("sandbox_id", "")
        self._state_dir = Path(provisioner_info["state_dir"])
        self.load_runtime_state(provisioner_info.get("sandbox_state", {}))
        self._sandbox_ready = True
        self._has_process = True
        track(self)

    async def adopt(self, member: dict[str, Any], fds: list[int], hold: Claim | None = None) -> None:
        """Take over a warm-pool member (what its :meth:`detach` returned) as this kernel's
        sandbox: the next launch connects to the kernel already running in it, then releases
        ``hold`` (the pool waits with its refill until then).

        Called from :func:`~sandbox_kernels.pool.claim.claim_from_pool` in :meth:`pre_launch`,
        before any port or file of this kernel exists.
        """
        await self.load_provisioner_info(member["provisioner_info"])
        self._has_process = False  # until launch_kernel has connected
        self._local_ports = {k: int(v) for k, v in member["local_ports"].items()}
        self._claimed = True
        self._pool_hold = hold
        self.take_over(fds)

    def _release_pool_hold(self) -> None:
        if self._pool_hold is not None:
            self._pool_hold.release()
            self._pool_hold = None

    async def detach(self) -> tuple[dict[str, Any], list[int]]:
        """Let go of the sandbox and its running kernel without stopping either, so that
        another process can :meth:`adopt` them (a pool member being claimed).

        Closes the control socket and the runtime's own handles (:meth:`release_sandbox`);
        the state directory stays, for the adopter.

        Returns:
            What :meth:`adopt` takes: the state to adopt, and descriptors to pass along
            (a VM slot's lock) that the caller closes once passed.
        """
        key = self.connection_info["key"]
        info = await self.get_provisioner_info()
        info["connection_info"] = {k: v.decode() if isinstance(v, bytes) else v
                                   for k, v in info.get("connection_info", {}).items()}
        member = {"provisioner_info": info, "local_ports": self.local_ports,
                  "connection": {"key": key.decode() if isinstance(key, bytes) else key,
                                 "signature_scheme": self.connection_info["signature_scheme"]}}
        if self._control is not None:
            await self._control.close()
            self._control = None
        fds = await self.release_sandbox()
        self._has_process = self._sandbox_ready = False
        self._state_dir = None
        untrack(self)
        return member, fds

    def get_shutdown_wait_time(self, recommended: float = 5.0) -> float:
        """Allow a little longer than a local kernel: signals cross an API or a tunnel."""
        return max(recommended, 4.0)

    # -- snapshot coordination ---------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def busy(self):  # type: ignore[no-untyped-def]
        """Mark a snapshot or rollback in progress: ``poll`` reports alive, signals wait."""
        self._busy += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._busy -= 1
            if not self._busy:
                self._idle.set()

    async def idle(self) -> None:
        """Wait until no snapshot or rollback is in progress."""
        await self._idle.wait()

    # -- teardown --------------------------------------------------------------------------

    async def teardown(self) -> None:
        """Remove the sandbox, the control socket and the state directory; idempotent.

        Called on launch failure, from :meth:`cleanup` and at interpreter exit (see
        :mod:`.exit_cleanup`). Never raises for a partly created sandbox.
        """
        self._has_process = False
        self._restarting = False
        self._sandbox_ready = False
        self._release_pool_hold()
        if self._control is not None:
            await self._control.close()
            self._control = None
        try:
            await self.destroy_sandbox()
        finally:
            if self._state_dir is not None:
                shutil.rmtree(self._state_dir, ignore_errors=True)
                self._state_dir = None
            untrack(self)

    async def _safe_diagnostics(self) -> str:
        try:
            text = await asyncio.wait_for(self.diagnostics(), timeout=10)
        except Exception as e:  # diagnostics must never hide the original error
            return f"\n(could not collect diagnostics: {e})"
        return f"\n{text}" if text else ""
