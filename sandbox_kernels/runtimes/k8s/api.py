"""A small, typed wrapper around the official ``kubernetes`` client.

Only :class:`KubeAPI` talks to the API server. Its methods block (call them with
:func:`sandbox_kernels.aio.to_thread` from async code); ``ApiException`` and connection
errors are caught here and become :class:`~sandbox_kernels.errors.SandboxError` subclasses
whose messages say what the API server answered.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from ...errors import (
    SandboxConfigError,
    SandboxConnectionError,
    SandboxError,
    SandboxNotFound,
    SandboxTimeout,
)
from ..registry import require
from . import exec_stream
from .exec_stream import MAX_OUTPUT, ExecResult

__all__ = ["ClusterInfo", "ExecResult", "KubeAPI"]


@dataclass(frozen=True)
class ClusterInfo:
    """Facts about the cluster that change what the manifest may ask for."""

    version: str
    minor: int

    @property
    def seccomp_field(self) -> bool:
        """``securityContext.seccompProfile`` exists from Kubernetes 1.19 on."""
        return self.minor >= 19


class KubeAPI:
    """One API client for one namespace.

    Args:
        namespace: the namespace every pod call addresses.
        kubeconfig: a kubeconfig file; empty means ``$KUBECONFIG`` or ``~/.kube/config``, or
            the in-cluster service account when neither exists and the process runs in a pod.
        context: the kubeconfig context (empty: its current context).
        request_timeout: seconds for each plain API request.

    Raises:
        SandboxUnavailable: the ``kubernetes`` package is not installed.
        SandboxConfigError: no usable configuration was found.
    """

    def __init__(self, namespace: str, kubeconfig: str = "", context: str = "",
                 request_timeout: float = 30.0) -> None:
        self._k8s = require("kubernetes")
        require("kubernetes.stream")
        self.namespace = namespace
        self.request_timeout = request_timeout
        self.source = ""
        self._client = self._load(kubeconfig, context)
        self._configuration = self._client.configuration
        self.core = self._k8s.client.CoreV1Api(self._client)
        self.version_api = self._k8s.client.VersionApi(self._client)
        self.networking = self._k8s.client.NetworkingV1Api(self._client)

    def _load(self, kubeconfig: str, context: str) -> Any:
        config = self._k8s.config
        path = os.path.expanduser(kubeconfig or os.environ.get("KUBECONFIG", "") or "~/.kube/config")
        path = path.split(os.pathsep)[0]
        try:
            if os.path.isfile(path):
                self.source = f"kubeconfig {path}"
                return config.new_client_from_config(config_file=path, context=context or None)
            if kubeconfig:
                raise SandboxConfigError(f"kubeconfig={kubeconfig!r} does not exist.")
            if os.environ.get("KUBERNETES_SERVICE_HOST"):
                configuration = self._k8s.client.Configuration()
                config.load_incluster_config(client_configuration=configuration)
                self.source = "in-cluster service account"
                return self._k8s.client.ApiClient(configuration)
        except config.ConfigException as e:
            raise SandboxConfigError(f"cannot use the Kubernetes configuration {path}: {e}") from e
        raise SandboxConfigError(
            f"no Kubernetes configuration: {path} does not exist and this is not a pod. Set "
            "'kubeconfig' in the kernelspec config or SANDBOX_K8S_KUBECONFIG."
        )

    def close(self) -> None:
        """Close the client's connection pool."""
        self._client.close()

    # -- requests ---------------------------------------------------------------------------

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one API request, mapping its errors.

        Raises:
            SandboxNotFound: 404.
            SandboxConfigError: 400/422 (the API server rejected what we sent) or 403.
            SandboxConnectionError: the API server could not be reached.
            SandboxError: any other answer.
        """
        kwargs.setdefault("_request_timeout", self.request_timeout)
        try:
            return fn(*args, **kwargs)
        except self._k8s.client.ApiException as e:
            raise _api_error(what, e) from e
        except (OSError, self._urllib3_error()) as e:
            raise SandboxConnectionError(f"{what}: cannot reach the Kubernetes API server ({e})") from e

    def _urllib3_error(self) -> type[BaseException]:
        import urllib3

        return urllib3.exceptions.HTTPError  # type: ignore[no-any-return]

    def cluster_info(self) -> ClusterInfo:
        """The API server's version.

        Raises:
            SandboxConnectionError, SandboxError: as for any request.
        """
        info = self._call("reading the server version", self.version_api.get_code)
        minor = int("".join(c for c in info.minor if c.isdigit()) or 0)
        return ClusterInfo(version=info.git_version, minor=minor)

    def create_pod(self, manifest: dict[str, Any]) -> None:
        """Create the pod described by ``manifest`` in the namespace.

        Raises:
            SandboxConfigError: the API server rejected the manifest (message says why).
            SandboxError, SandboxConnectionError: as for any request.
        """
        self._call(f"creating pod {manifest['metadata']['name']}",
                   self.core.create_namespaced_pod, self.namespace, manifest)

    def read_pod(self, name: str) -> Any | None:
        """The pod (a ``V1Pod``), or None if it does not exist.

        Raises:
            SandboxError, SandboxConnectionError: as for any request.
        """
        try:
            return self._call(f"reading pod {name}", self.core.read_namespaced_pod, name, self.namespace)
        except SandboxNotFound:
            return None

    def delete_pod(self, name: str, grace_seconds: int = 0) -> None:
        """Delete a pod at once (a missing pod is fine).

        Raises:
            SandboxError, SandboxConnectionError: as for any request.
        """
        body = self._k8s.client.V1DeleteOptions(grace_period_seconds=grace_seconds,
                                                propagation_policy="Background")
        try:
            self._call(f"deleting pod {name}", self.core.delete_namespaced_pod, name, self.namespace,
                       body=body, grace_period_seconds=grace_seconds)
        except SandboxNotFound:
            pass

    def list_pods(self, label_selector: str) -> list[Any]:
        """Pods in the namespace matching ``label_selector``."""
        result = self._call("listing pods", self.core.list_namespaced_pod, self.namespace,
                            label_selector=label_selector)
        return list(result.items)

    def pod_events(self, name: str) -> list[str]:
        """The pod's events, oldest first, as ``Reason: message`` lines."""
        result = self._call(f"reading the events of pod {name}", self.core.list_namespaced_event,
                            self.namespace, field_selector=f"involvedObject.name={name}")
        events = sorted(result.items, key=lambda e: _event_time(e))
        return [f"{e.reason}: {e.message}" for e in events if e.reason or e.message]

    # -- network policies ----------------------------------------------------------------------

    def create_network_policy(self, manifest: dict[str, Any]) -> None:
        """Create the NetworkPolicy described by ``manifest`` in the namespace.

        Raises:
            SandboxConfigError: the API server rejected it (403: the server's account may
                not create network policies; grant it, or set allow_network).
            SandboxError, SandboxConnectionError: as for any request.
        """
        self._call(f"creating network policy {manifest['metadata']['name']}",
                   self.networking.create_namespaced_network_policy, self.namespace, manifest)

    def read_network_policy(self, name: str) -> Any | None:
        """The NetworkPolicy (a ``V1NetworkPolicy``), or None if it does not exist."""
        try:
            return self._call(f"reading network policy {name}",
                              self.networking.read_namespaced_network_policy, name, self.namespace)
        except SandboxNotFound:
            return None

    def delete_network_policy(self, name: str) -> None:
        """Delete a NetworkPolicy (a missing one is fine).

        Raises:
            SandboxError, SandboxConnectionError: as for any request.
        """
        try:
            self._call(f"deleting network policy {name}",
                       self.networking.delete_namespaced_network_policy, name, self.namespace)
        except SandboxNotFound:
            pass

    def list_network_policies(self, label_selector: str) -> list[Any]:
        """NetworkPolicies in the namespace matching ``label_selector``."""
        result = self._call("listing network policies", self.networking.list_namespaced_network_policy,
                            self.namespace, label_selector=label_selector)
        return list(result.items)

    # -- websockets: exec and port-forward --------------------------------------------------

    def exec(self, pod: str, argv: Sequence[str], stdin: bytes | None = None,
             timeout: float = 30.0, container: str = "kernel", limit: int = MAX_OUTPUT) -> ExecResult:
        """Run ``argv`` in the pod's container (no shell, no TTY) and collect its output.

        The API server of older clusters cannot pass an end-of-file on stdin, so commands
        that read ``stdin`` must know its length (``head -c N``). The output is bounded (see
        :mod:`.exec_stream`).

        Raises:
            SandboxTimeout: the command did not end within ``timeout``.
            SandboxNotFound: the pod is gone.
            SandboxError: the output passed ``limit`` bytes, or the exec failed.
            SandboxConnectionError: the stream broke.
        """
        what = f"running {argv[0]!r} in pod {pod}"
        query: list[tuple[str, Any]] = [("command", list(argv)), ("container", container),
                                        ("stdin", str(stdin is not None).lower()), ("stdout", "true"),
                                        ("stderr", "true"), ("tty", "false")]
        ws = self._open_stream(what, f"pods/{quote(pod)}/exec", query, exec_stream.PROTOCOL)
        try:
            return exec_stream.collect(ws, stdin, timeout, what, limit)
        except SandboxError:
            raise
        except Exception as e:  # websocket errors have no common base worth naming
            raise SandboxConnectionError(f"{what}: {e}") from e
        finally:
            ws.close(timeout=1)

    def _open_stream(self, what: str, subresource: str, query: list[tuple[str, Any]],
                     protocol: str | None = None) -> Any:
        """Open a websocket to a pod subresource (exec, portforward) in the namespace.

        Raises:
            SandboxNotFound: the pod is gone.
            SandboxConfigError: the API server refused the request.
            SandboxConnectionError: the stream could not be opened.
        """
        from kubernetes.stream.ws_client import create_websocket, get_websocket_url

        path = f"/api/v1/namespaces/{quote(self.namespace)}/{subresource}"
        url = get_websocket_url(self._configuration.host + path, query)
        headers = {auth["key"].lower(): auth["value"]
                   for auth in self._configuration.auth_settings().values()
                   if auth.get("in") == "header" and auth.get("value")}
        if protocol:
            headers["sec-websocket-protocol"] = protocol
        try:
            return create_websocket(self._configuration, url, headers)
        except Exception as e:  # websocket-client's errors share no useful base
            raise _api_error(what, self._k8s.client.ApiException(status=0, reason=str(e))) from e

    def open_port_forward(self, pod: str, port: int) -> Any:
        """Open one port-forward stream to ``port`` on the pod (kubectl port-forward's path).

        The websocket is returned as it is (no proxy thread): :mod:`.forward` speaks the
        channel protocol itself, so a stream that breaks in any way ends its connection.

        Returns:
            A connected ``websocket.WebSocket``.

        Raises:
            SandboxNotFound: the pod is gone.
            SandboxConnectionError: the stream could not be opened.
        """
        return self._open_stream(f"forwarding to port {port} of pod {pod}",
                                 f"pods/{quote(pod)}/portforward", [("ports", str(port))])


def _event_time(event: Any) -> float:
    for value in (event.last_timestamp, event.event_time, event.first_timestamp):
        if value is not None:
            return float(value.timestamp())
    return 0.0


def _api_error(what: str, e: Any) -> SandboxError:
    """Map an ``ApiException`` to our error tree, keeping the server's own message."""
    message = e.reason or ""
    body = getattr(e, "body", None)
    if body:
        try:
            import json

            message = json.loads(body).get("message", message)
        except (ValueError, AttributeError):
            message = str(body)[:500]
    status = e.status
    if not status and message.startswith("Handshake status "):  # a websocket refused
        status = int(message.split()[2]) if message.split()[2].isdigit() else 0
        message = message.rpartition("-+-+- ")[2] or message
        try:
            import json

            message = json.loads(message).get("message", message)
        except (ValueError, AttributeError):
            pass
    text = f"{what}: {message} (HTTP {status})" if status else f"{what}: {message}"
    if status == 404:
        return SandboxNotFound(text)
    if status in (400, 403, 422):
        return SandboxConfigError(text)
    if status in (0, 502, 503, 504):
        return SandboxConnectionError(text)
    return SandboxError(text)
