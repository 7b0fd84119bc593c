"""gVisor runtime: the Docker runtime's container, run by ``runsc`` (a user-space kernel).

Composition with the Docker runtime: everything (container spec, limits, the shared ``ipc``
and ``conf`` directories, restart in the same container, filesystem snapshots) is
:class:`~sandbox_kernels.runtimes.docker.provisioner.DockerProvisioner`'s; this subclass
chooses the OCI runtime (``runsc-<platform>``, see :mod:`.platforms`) through the Docker
provisioner's public :meth:`container_runtime` hook, and pins the network to none (gVisor's
runtime entries carry ``--network=none``; the kernel's sockets are ``ipc`` sockets on the bind
mount, which ``--host-uds=create`` lets it create and the host connect to).

Memory snapshots would need ``runsc checkpoint`` through ``docker checkpoint`` (an
experimental engine); ``doctor`` reports whether that could work, and snapshots here keep the
container's files only.
"""

from __future__ import annotations

from typing import Any

from traitlets import Enum, Unicode, validate

from ...aio import to_thread
from ...errors import SandboxConfigError
from ...snapshots.model import Capabilities
from ...settings import env_default
from ..docker.engine import DockerEngine
from ..docker.provisioner import DockerProvisioner
from .platforms import SETTINGS, PlatformChoice, choose_platform, registered_platforms


def engine_platforms(engine: DockerEngine) -> list[str]:
    """The gVisor platforms registered with ``engine`` (blocking: call it off the loop)."""
    return registered_platforms(dict(engine.client.info().get("Runtimes") or {}))


class GVisorProvisioner(DockerProvisioner):
    """Runs the kernel in a Docker container under gVisor (kernel name ``sandbox-gvisor``).

    Limits and defaults are the Docker runtime's (its settings and their ``SANDBOX_DOCKER_*``
    variables and ``c.DockerProvisioner.*`` keys apply here too); only ``platform`` is new.
    """

    runtime = "gvisor"
    kernel_name = "sandbox-gvisor"

    platform = Enum(list(SETTINGS), "auto", config=True,
                    help="gVisor platform: 'auto' (the first of kvm, systrap, ptrace that works "
                    "here), 'ptrace', 'kvm' or 'systrap' (runsc builds from 2023). One that does "
                    "not work here falls back with a warning. Env: SANDBOX_GVISOR_PLATFORM.")
    _platform_default = env_default("platform", "SANDBOX_GVISOR_PLATFORM")

    network = Unicode("none", help="Always 'none': gVisor's runtime entries run with "
                      "--network=none, and the kernel is reached through ipc sockets."
                      ).tag(widen="admin", narrowest="none")

    @validate("network")
    def _check_network(self, proposal: dict[str, Any]) -> str:
        if proposal["value"] != "none":
            raise SandboxConfigError(
                f"network={proposal['value']!r}: gVisor kernels have no network (their runsc "
                f"runtimes run with --network=none); use the sandbox-docker kernel for one.")
        return "none"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.platform_choice: PlatformChoice | None = None

    def container_runtime(self) -> str:
        """``runsc-<platform>``, chosen in :meth:`create_sandbox`."""
        if self.platform_choice is None:  # a programming error: create_sandbox runs first
            raise RuntimeError("the gVisor platform is chosen in create_sandbox")
        return self.platform_choice.runtime

    async def create_sandbox(self) -> None:
        """The Docker checks (engine, image), then the platform (a loud fallback warns).

        Raises:
            SandboxUnavailable: no gVisor runtime is registered with the Docker engine.
        """
        await super().create_sandbox()
        self.platform_choice = await to_thread(self._choose)
        if self.platform_choice.fallback:
            self.log.warning("kernel %s: %s", self.kernel_id, self.platform_choice.reason)
        else:
            self.log.info("kernel %s: gVisor %s", self.kernel_id, self.platform_choice.reason)

    def _choose(self) -> PlatformChoice:
        engine = DockerEngine(timeout=10)
        try:
            return choose_platform(self.platform, engine_platforms(engine))
        finally:
            engine.close()

    def runtime_state(self) -> dict[str, Any]:
        """The Docker state and the platform, for re-attaching."""
        state = super().runtime_state()
        if self.platform_choice is not None:
            state["gvisor_platform"] = self.platform_choice.platform
            state["gvisor_runtime"] = self.platform_choice.runtime
        return state

    def load_runtime_state(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`runtime_state`."""
        super().load_runtime_state(state)
        if state.get("gvisor_runtime"):
            self.platform_choice = PlatformChoice(state["gvisor_platform"], state["gvisor_runtime"],
                                                  "re-attached")

    def snapshot_capabilities(self) -> Capabilities:
        """Filesystem snapshots, as for Docker; rollback restarts the kernel."""
        return Capabilities(
            kinds=["filesystem"], default_kind="filesystem",
            note="gVisor snapshots keep the container's files; rollback restarts the kernel, "
                 "so variables in memory are not kept (memory snapshots would need runsc "
                 "checkpoint through an experimental Docker engine: see `sandbox-kernels doctor`).",
        )
