"""Docker runtime: one container per kernel, no network, ZMQ over ipc sockets.

The kernel's sockets are unix sockets in a per-kernel directory bind-mounted into the
container at the same path, so the container needs no network at all. That directory is the
only host directory the container can write; the connection file comes in through a
read-only mount, and the rest of the kernel's state directory (the control socket included)
is never mounted (see :mod:`.dirs`). Docker's init (``--init``) is PID 1 and forwards
signals to the kernel; when the kernel exits the container stops, so ``poll`` is a container
state check. Restart starts the same container again.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import time
from typing import Any

from traitlets import Bool, Float, Int, Unicode, validate

from ...aio import to_thread
from ...errors import SandboxConfigError, SandboxNotFound, SandboxStartError
from ...labels import KERNEL_ID
from ...snapshots.model import Capabilities, Snapshot
from ...snapshots.quota import Quota
from ...provisioning.base import SandboxProvisioner
from ...settings import env_default, parse_size
from .dirs import CONTAINER_CONNECTION_FILE, IPC_DIR, KernelDirs, release_ipc
from .engine import DockerEngine, container_memory

DEFAULT_IMAGE = "sandbox-kernels/python:latest"
SNAPSHOT_REPOSITORY = "sandbox-kernels/snapshot"
SNAPSHOT_LABEL = "sandbox-kernels.snapshot"
_KEEP_LABEL = "sandbox-kernels.keep"
_CREATED_LABEL = "sandbox-kernels.created"
_BASE_SIZE_LABEL = "sandbox-kernels.base-size"  # bytes of the image committed from
_SANDBOX_UID = 1000  # the image's `executor` user
#: What the engine keeps of the kernel's raw stdout/stderr on the host's disk: the kernel writes
#: as much as it likes; the host keeps two 10 MB files (the diagnostics read their tail).
_LOG_CONFIG = {"type": "json-file", "config": {"max-size": "10m", "max-file": "2"}}


class DockerProvisioner(SandboxProvisioner):
    """Runs the kernel in a Docker container (kernel name ``sandbox-docker``)."""

    runtime = "docker"
    kernel_name = "sandbox-docker"
    supports_pool = True

    image = Unicode(DEFAULT_IMAGE, config=True,
                    help="Image with python3 and ipykernel. Env: SANDBOX_DOCKER_IMAGE.")
    _image_default = env_default("image", "SANDBOX_DOCKER_IMAGE")

    memory = Unicode("1g", config=True,
                     help="Memory limit, e.g. '512m', '2g' (no swap beyond it). "
                     "Env: SANDBOX_DOCKER_MEMORY.")
    _memory_default = env_default("memory", "SANDBOX_DOCKER_MEMORY")

    cpus = Float(1.0, config=True, help="CPU limit in cores (0 = no limit). Env: SANDBOX_DOCKER_CPUS.")
    _cpus_default = env_default("cpus", "SANDBOX_DOCKER_CPUS")

    pids_limit = Int(256, config=True,
                     help="Maximum processes in the container. Env: SANDBOX_DOCKER_PIDS_LIMIT.")
    _pids_limit_default = env_default("pids_limit", "SANDBOX_DOCKER_PIDS_LIMIT")

    network = Unicode("none", config=True,
                      help="'none' (default: no network, ipc sockets) or a Docker network name "
                      "such as 'bridge'; then ports are published on 127.0.0.1 only. "
                      "Env: SANDBOX_DOCKER_NETWORK.").tag(widen="admin", narrowest="none")
    _network_default = env_default("network", "SANDBOX_DOCKER_NETWORK")

    read_only = Bool(False, config=True,
                     help="Read-only root filesystem; the work dir and /tmp stay writable "
                     "(tmpfs). Env: SANDBOX_DOCKER_READ_ONLY.").tag(widen="false")
    _read_only_default = env_default("read_only", "SANDBOX_DOCKER_READ_ONLY")

    workdir = Unicode("/home/executor", config=True, help="The kernel's working directory.")

    _pool_size_default = env_default("pool_size", "SANDBOX_DOCKER_POOL_SIZE")

    @validate("cpus")
    def _check_cpus(self, proposal: dict[str, Any]) -> float:
        value = proposal["value"]
        if value < 0 or value > (os.cpu_count() or 1) * 4:
            raise SandboxConfigError(
                f"cpus={value} is out of range: use 0 (no limit) up to the host's cores "
                f"({os.cpu_count()})."
            )
        return float(value)

    @validate("pids_limit")
    def _check_pids(self, proposal: dict[str, Any]) -> int:
        value = proposal["value"]
        if not 16 <= value <= 1_000_000:
            raise SandboxConfigError(f"pids_limit={value} is out of range: use 16 to 1000000.")
        return int(value)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._engine: DockerEngine | None = None
        self.container_id: str | None = None
        self._current_image: str | None = None  # a snapshot's image after a rollback

    # -- settings ----------------------------------------------------------------------------

    def validate_settings(self) -> None:
        """Check memory and the workdir before anything is created."""
        super().validate_settings()
        size = parse_size(self.memory, "memory")
        if size < 64 * 1024**2:
            raise SandboxConfigError(f"memory={self.memory!r} is too small: the kernel needs 64m or more.")
        if not self.workdir.startswith("/"):
            raise SandboxConfigError(f"workdir={self.workdir!r} must be an absolute path.")

    @property
    def _dirs(self) -> KernelDirs:
        ids = (_SANDBOX_UID, _SANDBOX_UID) if os.geteuid() == 0 else None
        return KernelDirs(self.state_dir, ids)

    @property
    def _ipc(self) -> bool:
        return self.network == "none"

    def configure_transport(self, km: Any) -> None:
        """ipc sockets in the kernel's ipc directory, or TCP on 127.0.0.1 with a network."""
        if self._ipc:
            km.transport = "ipc"
            km.ip = str(self._dirs.ipc / "k")
        else:
            super().configure_transport(km)

    def sandbox_connection_file(self) -> str:
        """The container's own copy of the read-only connection file (see :mod:`.dirs`)."""
        return CONTAINER_CONNECTION_FILE

    def sandbox_connection_info(self) -> dict[str, Any]:
        """With a network, the kernel binds all interfaces of its own namespace."""
        info = super().sandbox_connection_info()
        if not self._ipc:
            info["ip"] = "0.0.0.0"
        return info

    # -- hooks -------------------------------------------------------------------------------

    async def _engine_ready(self) -> DockerEngine:
        if self._engine is None:
            self._engine = await to_thread(DockerEngine)
        return self._engine

    async def create_sandbox(self) -> None:
        """Check the engine and image; the container itself is made in :meth:`start_kernel`."""
        engine = await self._engine_ready()
        await to_thread(engine.check_image, self.image)

    def container_runtime(self) -> str:
        """The engine's OCI runtime for the kernel's container; '' for the engine's default (runc).

        Called from :meth:`start_kernel` when it creates the container; runtimes built on this
        one override it (gVisor: ``runsc-<platform>``). No ``super()`` needed.
        """
        return ""

    def _container_spec(self, cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
        memory = parse_size(self.memory, "memory")
        home = self.workdir
        user = f"{_SANDBOX_UID}:{_SANDBOX_UID}" if os.geteuid() == 0 else f"{os.getuid()}:{os.getgid()}"
        spec: dict[str, Any] = dict(
            image=self._current_image or self.image,
            command=self._dirs.container_command(cmd),
            name=self.sandbox_name,
            hostname=f"sandbox-{self.sandbox_id[:8]}",
            labels=self.labels,
            init=True,
            user=user,
            environment={**env, "HOME": home},
            working_dir=home,
            mem_limit=memory,
            memswap_limit=memory,
            pids_limit=self.pids_limit,
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            read_only=self.read_only,
            volumes=self._dirs.volumes(),
            network_mode=self.network,
            log_config=_LOG_CONFIG,
        )
        if self.cpus:
            spec["nano_cpus"] = int(self.cpus * 1e9)
        if self.container_runtime():
            spec["runtime"] = self.container_runtime()
        if self.read_only:
            spec["tmpfs"] = {"/tmp": "rw,nosuid,nodev,size=256m",
                             home: f"rw,nosuid,nodev,size=512m,uid={user.split(':')[0]}"}
        if not self._ipc:
            ports = [self.connection_info[f"{ch}_port"]
                     for ch in ("shell", "iopub", "stdin", "control", "hb")]
            spec["ports"] = {f"{p}/tcp": ("127.0.0.1", p) for p in ports}
        return spec

    async def start_kernel(self, cmd: list[str], env: dict[str, str]) -> None:
        """A fresh ipc directory and the connection file, then start the existing container
        or create one. No kernel runs here: the container is stopped or gone."""
        await to_thread(self._dirs.prepare, self.sandbox_connection_info())
        engine = await self._engine_ready()
        if self.container_id:
            try:
                await to_thread(engine.start, self.container_id)
                return
            except SandboxNotFound:
                self.log.warning("Container of kernel %s was removed; creating a new one", self.kernel_id)
                self.container_id = None
        spec = self._container_spec(cmd, env)
        await to_thread(engine.remove, self.sandbox_name)  # a stale one from a crash
        self.container_id = await to_thread(engine.create, **spec)
        await to_thread(engine.start, self.container_id)

    async def wait_ready(self) -> None:
        """Wait until the kernel has bound its sockets, or fail with the container's output."""
        engine = await self._engine_ready()
        info = self.connection_info
        ports = [info[f"{ch}_port"] for ch in ("shell", "iopub", "stdin", "control", "hb")]
        deadline = time.monotonic() + self.launch_timeout
        while time.monotonic() < deadline:
            if self._ipc and await to_thread(self._dirs.sockets_bound, info["ip"], ports):
                return
            state = await to_thread(engine.state, self.container_id)
            if state is None or state.get("Status") in ("exited", "dead"):
                logs = await to_thread(engine.logs, self.container_id) if state else ""
                raise SandboxStartError(
                    f"the kernel in container {self.sandbox_name} exited during start-up "
                    f"(exit code {state.get('ExitCode') if state else 'unknown'}). Does image "
                    f"{self.image!r} have python3 with ipykernel? Container output:\n{logs}"
                )
            if not self._ipc and state.get("Running"):
                return  # TCP ports: the client's kernel_info wait covers the rest
            await asyncio.sleep(0.05)

    async def kernel_exit_code(self) -> int | None:
        """The container's state: running -> None, exited -> its code, gone -> -1."""
        if not self.container_id:
            return -1
        engine = await self._engine_ready()
        state = await to_thread(engine.state, self.container_id)
        if state is None:
            return -1
        if state.get("Status") in ("created", "running", "restarting", "paused"):
            return None
        return int(state.get("ExitCode", -1))

    async def signal_kernel(self, signum: int) -> None:
        """Signal the container's init, which forwards the signal to the kernel."""
        if self.container_id:
            engine = await self._engine_ready()
            await to_thread(engine.kill, self.container_id, signum)

    async def stop_kernel(self) -> None:
        """Before a restart in the same container: make sure the old kernel has stopped."""
        if self.container_id:
            engine = await self._engine_ready()
            await to_thread(engine.kill, self.container_id, 9)
            await to_thread(engine.wait_stopped, self.container_id, 10)

    async def diagnostics(self) -> str:
        """The container's last output lines."""
        if not (self.container_id and self._engine):
            return ""
        logs = await to_thread(self._engine.logs, self.container_id)
        return f"Container output:\n{logs}" if logs else ""

    async def release_sandbox(self) -> list[int]:
        """Close the engine client; the container and its kernel go on (a pool member's
        claim), with its ipc directory in the state directory the adopter takes over."""
        if self._engine is not None:
            await to_thread(self._engine.close)
            self._engine = None
        return []

    async def pool_identity(self) -> dict[str, Any]:
        """The image's id: a rebuilt image is a new pool."""
        engine = await self._engine_ready()
        return {"image_id": await to_thread(engine.check_image, self.image)}

    async def memory_held(self) -> int:
        """The container's memory use (its cgroup's ``memory.current``)."""
        if not self.container_id:
            return 0
        return await to_thread(container_memory, self.container_id)

    async def destroy_sandbox(self) -> None:
        """Remove the container (by id and by name, so a half-created one goes too)."""
        try:
            engine = await self._engine_ready()
        except Exception:
            self.log.warning("Docker engine unreachable: container %s may remain "
                             "(`sandbox-kernels reap` removes it later)", self.sandbox_name)
            if self.has_state_dir:
                await to_thread(release_ipc, self.state_dir / IPC_DIR)
            return
        for ref in filter(None, (self.container_id, self.sandbox_name)):
            await to_thread(engine.remove, ref)
        self.container_id = None
        if self.has_state_dir:  # what the sandbox wrote, before the base removes the rest
            await to_thread(release_ipc, self.state_dir / IPC_DIR)
        for snap in await self.snapshot_list():
            if not snap.keep:
                await to_thread(engine.remove_image, self._snapshot_ref(snap.name))
        await to_thread(engine.close)
        self._engine = None

    def runtime_state(self) -> dict[str, Any]:
        """The container id and current image, for re-attaching."""
        return {"container_id": self.container_id, "image": self._current_image}

    def load_runtime_state(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`runtime_state`."""
        self.container_id = state.get("container_id")
        self._current_image = state.get("image")

    # -- snapshots: the container's filesystem, committed to a local image ----------------------

    def snapshot_capabilities(self) -> Capabilities:
        """Filesystem snapshots; rollback restarts the kernel (memory is not kept)."""
        return Capabilities(
            kinds=["filesystem"], default_kind="filesystem",
            note="Docker snapshots keep the container's files; rollback restarts the kernel, "
                 "so variables in memory are not kept.",
        )

    def _snapshot_ref(self, name: str) -> str:
        return f"{SNAPSHOT_REPOSITORY}:{self.sandbox_id}-{name}"

    async def snapshot_list(self) -> list[Snapshot]:
        """Images committed from this kernel's container."""
        engine = await self._engine_ready()
        rows = await to_thread(engine.images, f"{KERNEL_ID}={self.sandbox_id}")
        snaps = []
        for row in rows:
            labels = row.get("Labels") or {}
            if SNAPSHOT_LABEL not in labels:
                continue
            created = dt.datetime.fromtimestamp(int(labels.get(_CREATED_LABEL, row.get("Created", 0))),
                                                dt.timezone.utc)
            size = max(0, int(row.get("Size") or 0) - int(labels.get(_BASE_SIZE_LABEL, 0)))
            snaps.append(Snapshot(name=labels[SNAPSHOT_LABEL], kind="filesystem",
                                  created=created.isoformat(timespec="seconds"),
                                  size=size, keep=labels.get(_KEEP_LABEL) == "true"))
        return snaps

    async def snapshot_create(self, name: str, kind: str, keep: bool) -> Snapshot:
        """``docker commit`` the container (paused for the moment of the commit).

        The snapshot's size is its own layer: the committed image less the image the
        container runs from (what the snapshot quota counts).

        Raises:
            SandboxQuotaExceeded: the container's files would take the kernel's snapshots
                over ``snapshot_max_bytes`` (measured before anything is written).
        """
        if not self.container_id:
            raise SandboxNotFound(f"kernel {self.kernel_id} has no container to snapshot")
        engine = await self._engine_ready()
        now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
        base = await to_thread(engine.image_size, self._current_image or self.image)
        labels = {**self.labels, SNAPSHOT_LABEL: name, _KEEP_LABEL: str(keep).lower(),
                  _CREATED_LABEL: str(int(now.timestamp())), _BASE_SIZE_LABEL: str(base)}
        repo, _, tag = self._snapshot_ref(name).partition(":")
        existing = await self.snapshot_list()
        # Frozen from the measure to the end of the commit: a sparse file the kernel makes
        # meanwhile would be written out whole (1 TiB of zeros) into Docker's storage.
        await to_thread(engine.pause, self.container_id, True)
        try:
            Quota.of(self).check_room(existing, estimate=await to_thread(engine.rw_size, self.container_id))
            size = await to_thread(engine.commit, self.container_id, repo, tag, labels, False)
        finally:
            await to_thread(engine.pause, self.container_id, False)
        return Snapshot(name=name, kind="filesystem", created=now.isoformat(), size=max(0, size - base),
                        keep=keep)

    async def snapshot_rollback(self, snapshot: Snapshot) -> bool:
        """Replace the container with one from the snapshot's image; the kernel restarts."""
        engine = await self._engine_ready()
        if self.container_id:
            await to_thread(engine.remove, self.container_id)
        self.container_id = None
        self._current_image = self._snapshot_ref(snapshot.name)
        await self.relaunch_kernel()
        return True

    async def snapshot_delete(self, snapshot: Snapshot) -> None:
        """Remove the snapshot's image (refused while the container runs from it)."""
        ref = self._snapshot_ref(snapshot.name)
        if ref == self._current_image:
            raise SandboxConfigError(
                f"snapshot {snapshot.name!r} is what the kernel currently runs from; roll back "
                f"to another snapshot or restart the kernel's sandbox before deleting it."
            )
        engine = await self._engine_ready()
        await to_thread(engine.remove_image, ref)
