"""Kubernetes runtime: one pod per kernel (kernel name ``sandbox-k8s``).

The pod runs a tiny init as the image's unprivileged user, locked down (non-root, no
capabilities, no privilege escalation, the runtime's default seccomp profile, no service
account token unless asked, a deny-all NetworkPolicy unless ``allow_network``, a bounded
``ephemeral-storage``). The kernel is started in it by exec, binds its ZMQ ports on the
pod's 127.0.0.1 (ports of its own choosing, read back from its connection file), and is
reached through the API server's pod port-forward (the path of ``kubectl port-forward``):
local listeners (unix sockets in the kernel's state directory, or 127.0.0.1 ports) keep the
connection info's endpoints for the kernel's lifetime, and every connection made to them
opens its own stream, so a dropped stream is re-established by the next connection. Exec
output is bounded (:mod:`..k8s.exec_stream`). Interrupts are signals sent by exec; a restart
replaces the kernel process and keeps the pod; shutdown deletes the pod with a grace period of 0.

Every Kubernetes call blocks, so each runs off the event loop (``to_thread``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from traitlets import Bool, Dict, Enum, Float, List, Unicode, validate

from ...aio import to_thread
from ...errors import SandboxConfigError, SandboxConnectionError, SandboxError, SandboxStartError
from . import checks
from .api import KubeAPI
from .forward import PortForwarder
from .manifest import k8s_labels, network_policy_manifest, pod_manifest
from .pod_status import container_running, pending_detail, start_problem, unschedulable
from .process import PodProcess
from ...labels import PREFIX
from ...remote.kernel import RemoteKernel
from ...remote.provisioner import RemoteKernelProvisioner
from ...settings import env_default

DEFAULT_IMAGE = "sandbox-kernels/python:latest"
KERNEL_DIR = "/tmp/sandbox-kernel"
LABEL_SELECTOR_KEY = f"{PREFIX}/kernel-id"


class KubernetesProvisioner(RemoteKernelProvisioner):
    """Runs the kernel in a Kubernetes pod."""

    runtime = "k8s"
    kernel_name = "sandbox-k8s"

    kubeconfig = Unicode("", config=True,
                         help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config; in a pod, "
                         "its service account). Env: SANDBOX_K8S_KUBECONFIG.").tag(widen="admin")
    _kubeconfig_default = env_default("kubeconfig", "SANDBOX_K8S_KUBECONFIG")
    context = Unicode("", config=True, help="kubeconfig context (default: the current one). "
                      "Env: SANDBOX_K8S_CONTEXT.").tag(widen="admin")
    _context_default = env_default("context", "SANDBOX_K8S_CONTEXT")
    namespace = Unicode("default", config=True, help="Namespace of the kernel pods. "
                        "Env: SANDBOX_K8S_NAMESPACE.").tag(widen="admin")
    _namespace_default = env_default("namespace", "SANDBOX_K8S_NAMESPACE")
    image = Unicode(DEFAULT_IMAGE, config=True,
                    help="Image with python3, ipykernel and a user of uid 1000. Env: SANDBOX_K8S_IMAGE.")
    _image_default = env_default("image", "SANDBOX_K8S_IMAGE")
    image_pull_policy = Enum(["Always", "IfNotPresent", "Never"], "IfNotPresent", config=True,
                             help="The pod's imagePullPolicy. Env: SANDBOX_K8S_IMAGE_PULL_POLICY.")
    _image_pull_policy_default = env_default("image_pull_policy", "SANDBOX_K8S_IMAGE_PULL_POLICY")
    resources = Dict(
        {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}},
        config=True,
        help="The container's resources: {'requests': {'cpu': ..., 'memory': ...}, 'limits': {...}} "
        "in Kubernetes quantities ('500m', '2Gi').")
    node_selector = Dict(config=True, help="Node labels the pod must be scheduled on.").tag(widen="admin")
    tolerations = List(Dict(), config=True,
                       help="Tolerations, as Kubernetes writes them ({'key', 'operator', 'value', 'effect'}).").tag(widen="admin")
    service_account = Unicode("", config=True, help="The pod's service account (default: the "
                              "namespace's 'default').").tag(widen="admin")
    automount_service_account_token = Bool(False, config=True,
                                           help="Mount the service account's token in the pod "
                                           "(off: the kernel gets no cluster credentials).").tag(widen="true")
    python = Unicode("python3", config=True, help="Python in the image (runs the pod's init and "
                     "the kernel).")
    schedule_timeout = Float(10.0, config=True,
                             help="Seconds a pod may stay unschedulable before the launch fails with "
                             "the scheduler's reason (raise it where a cluster autoscaler adds nodes).")
    request_timeout = Float(30.0, config=True, help="Seconds for each Kubernetes API request.")
    allow_network = Bool(False, config=True,
                         help="Let the pod send and receive network traffic. Off: a deny-all "
                         "NetworkPolicy (ingress and egress) is created with the pod (enforced "
                         "where the cluster's network plugin enforces NetworkPolicies). "
                         "Env: SANDBOX_K8S_ALLOW_NETWORK.").tag(widen="true")
    _allow_network_default = env_default("allow_network", "SANDBOX_K8S_ALLOW_NETWORK")
    ephemeral_storage = Unicode("2Gi", config=True,
                                help="The kernel container's ephemeral-storage limit (files it "
                                "writes, its logs; past it the kubelet evicts the pod), unless "
                                "resources.limits sets one; '' for none. "
                                "Env: SANDBOX_K8S_EPHEMERAL_STORAGE.")
    _ephemeral_storage_default = env_default("ephemeral_storage", "SANDBOX_K8S_EPHEMERAL_STORAGE")
    runtime_class_name = Unicode("", config=True,
                                 help="The pod's RuntimeClass (e.g. 'gvisor' or 'kata' where the "
                                 "cluster has one); '' for the cluster's default. Only an admin "
                                 "chooses it: another class can widen isolation (e.g. 'runc' where "
                                 "the admin set gVisor). Env: SANDBOX_K8S_RUNTIME_CLASS_NAME."
                                 ).tag(widen="admin")
    _runtime_class_name_default = env_default("runtime_class_name", "SANDBOX_K8S_RUNTIME_CLASS_NAME")

    #: A restart in the same pod waits this long for the killed kernel to be gone.
    stop_wait = 5.0

    @validate("runtime_class_name")
    def _check_runtime_class_name(self, proposal: dict[str, Any]) -> str:
        value = proposal["value"]
        if value and not checks.DNS_SUBDOMAIN.fullmatch(value):
            raise SandboxConfigError(f"runtime_class_name={value!r} is not a RuntimeClass name "
                                     "(lowercase letters, digits, '-' and '.'; at most 253).")
        return str(value)

    @validate("namespace")
    def _check_namespace(self, proposal: dict[str, Any]) -> str:
        if not checks.DNS_LABEL.fullmatch(proposal["value"]):
            raise SandboxConfigError(f"namespace={proposal['value']!r} is not a namespace name "
                                     "(lowercase letters, digits and '-').")
        return str(proposal["value"])

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._api: KubeAPI | None = None

    # -- settings -----------------------------------------------------------------------------

    def validate_settings(self) -> None:
        """Check names, quantities, selectors and tolerations before anything is created."""
        super().validate_settings()
        if not self.image or any(c.isspace() for c in self.image):
            raise SandboxConfigError(f"image={self.image!r} is not an image reference.")
        if not self.python or any(c.isspace() for c in self.python):
            raise SandboxConfigError(f"python={self.python!r} must be one program path.")
        if self.service_account and not checks.DNS_SUBDOMAIN.fullmatch(self.service_account):
            raise SandboxConfigError(f"service_account={self.service_account!r} is not a valid name.")
        checks.check_resources(self.resources)
        if self.ephemeral_storage and not checks.QUANTITY.fullmatch(self.ephemeral_storage):
            raise SandboxConfigError(f"ephemeral_storage={self.ephemeral_storage!r} is not a Kubernetes "
                                     "quantity (e.g. '2Gi'); '' for no limit.")
        checks.check_node_selector(self.node_selector)
        checks.check_tolerations(self.tolerations)
        if not checks.DNS_SUBDOMAIN.fullmatch(self.pod_name):
            raise SandboxConfigError(f"kernel id {self.kernel_id!r} cannot name a pod "
                                     "(lowercase letters, digits and '-' only).")

    @property
    def pod_name(self) -> str:
        """The pod's name: ``sandbox-kernels-<kernel id>``."""
        return self.sandbox_name

    async def _ensure_api(self) -> KubeAPI:
        if self._api is None:
            self._api = await to_thread(KubeAPI, self.namespace, self.kubeconfig, self.context,
                                        self.request_timeout)
        return self._api

    # -- lifecycle hooks ----------------------------------------------------------------------

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        """Run the configured Python in the pod instead of the kernelspec's ``python3``."""
        kwargs = await super().pre_launch(**kwargs)
        kwargs["cmd"][0] = self.python
        return kwargs

    def remote_dir(self) -> str:
        """One kernel per pod: a fixed directory in it."""
        return KERNEL_DIR

    async def connect_kernel(self) -> RemoteKernel:
        """A kernel driven by exec into the pod and reached by its port-forward."""
        api = await self._ensure_api()
        forwarder = PortForwarder(self._open_stream, self.pod_name, self.log)
        return RemoteKernel(PodProcess(api, self.pod_name), forwarder, remote_dir=KERNEL_DIR,
                            launch_timeout=self.launch_timeout, log=self.log, state=self.kernel_state)

    async def create_sandbox(self) -> None:
        """Create the pod (after its deny-all NetworkPolicy unless ``allow_network``) and wait
        until its container runs (or fail with the pod's reason)."""
        api = await self._ensure_api()
        cluster = await to_thread(api.cluster_info)
        labels = k8s_labels(self.labels)
        if not self.allow_network:
            policy = network_policy_manifest(name=self.pod_name, labels=labels, kernel_label=LABEL_SELECTOR_KEY)
            await to_thread(api.create_network_policy, policy)
        manifest = pod_manifest(
            name=self.pod_name,
            labels=labels,
            image=self.image,
            image_pull_policy=self.image_pull_policy,
            python=self.python,
            resources=self.resources,
            node_selector=self.node_selector,
            tolerations=self.tolerations,
            service_account=self.service_account,
            automount_token=self.automount_service_account_token,
            seccomp=cluster.seccomp_field,
            ephemeral_storage=self.ephemeral_storage,
            runtime_class_name=self.runtime_class_name,
        )
        self.log.info("Creating pod %s/%s (image %s)", self.namespace, self.pod_name, self.image)
        await to_thread(api.create_pod, manifest)
        await self._wait_running()

    def _open_stream(self, port: int) -> Any:
        assert self._api is not None
        return self._api.open_port_forward(self.pod_name, port)

    async def _wait_running(self) -> None:
        api = self._api
        assert api is not None
        unschedulable_since: float | None = None
        shown = ""
        while True:
            pod = await to_thread(api.read_pod, self.pod_name)
            if pod is None:
                raise SandboxStartError(f"pod {self.pod_name} disappeared while starting.")
            problem = start_problem(pod)
            if problem:
                raise SandboxStartError(f"pod {self.pod_name} cannot start: {problem}"
                                        f"{await self._events_text()}")
            if container_running(pod):
                return
            detail = pending_detail(pod)
            if detail and detail != shown:  # the pod's pending reason, for JupyterLab
                self.start_progress.phase("creating", f"pod {pod.status.phase or 'Pending'}: {detail}")
                shown = detail
            reason = unschedulable(pod)
            if reason:
                unschedulable_since = unschedulable_since or time.monotonic()
                if time.monotonic() - unschedulable_since >= self.schedule_timeout:
                    raise SandboxStartError(f"pod {self.pod_name} cannot be scheduled: {reason}")
            await asyncio.sleep(0.3)

    async def kernel_exit_code(self) -> int | None:
        """The pod's phase and container state first, then the kernel process itself."""
        if self.pid is None:
            return -1
        api = await self._ensure_api()
        try:
            pod = await to_thread(api.read_pod, self.pod_name)
        except SandboxConnectionError as e:
            self.log.warning("Kernel %s: API server unreachable (%s); assuming alive", self.kernel_id, e)
            return None
        if pod is None or pod.metadata.deletion_timestamp is not None:
            return -1
        if pod.status.phase in ("Failed", "Succeeded") or not container_running(pod):
            return -1
        kernel = await self.remote_kernel()
        if not kernel.forwarder.forwards and self.kernel_state.ports:  # re-attached from saved state
            kernel.set_local_ends(self.channel_ports, self.client_sockets())
            await to_thread(kernel.point_forwards, self.kernel_state.ports)
        return await kernel.exit_code()

    async def destroy_sandbox(self) -> None:
        """Close the forwards and delete the pod (grace period 0); wait until it is gone."""
        await self.close_kernel()
        self.pid = None
        try:
            api = await self._ensure_api()  # a re-attached kernel may not have a client yet
        except SandboxError as e:
            self.log.warning("Kernel %s: cannot reach the cluster to delete pod %s: %s",
                             self.kernel_id, self.pod_name, e)
            return
        self._api = None
        try:
            await to_thread(api.delete_pod, self.pod_name, 0)
            for _ in range(100):
                if await to_thread(api.read_pod, self.pod_name) is None:
                    break
                await asyncio.sleep(0.1)
        except SandboxError as e:
            self.log.warning("Kernel %s: could not delete pod %s: %s", self.kernel_id, self.pod_name, e)
        try:
            await to_thread(api.delete_network_policy, self.pod_name)
        except SandboxError as e:
            self.log.warning("Kernel %s: could not delete network policy %s: %s", self.kernel_id,
                             self.pod_name, e)
        finally:
            await to_thread(api.close)

    async def diagnostics(self) -> str:
        """The pod's events and the kernel log's tail."""
        parts = [await self._events_text()]
        if self.pid is not None:
            parts.append(await super().diagnostics())
        return "\n".join(p for p in parts if p)

    async def _events_text(self) -> str:
        if self._api is None:
            return ""
        try:
            events = await to_thread(self._api.pod_events, self.pod_name)
        except SandboxError:
            return ""
        return ("\nPod events:\n  " + "\n  ".join(events[-10:])) if events else ""

    def runtime_state(self) -> dict[str, Any]:
        """Pod, namespace, kernel pid and pod ports (for re-attaching)."""
        return {"pod": self.pod_name, "namespace": self.namespace, **super().runtime_state()}

    def load_runtime_state(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`runtime_state`."""
        super().load_runtime_state(state)
        if state.get("namespace"):
            self.namespace = state["namespace"]

