"""Doctor checks for the Kubernetes runtime: is the client installed, is a cluster reachable."""

from __future__ import annotations

from typing import Any

from ...doctor import RuntimeReport
from ...errors import SandboxError
from .api import KubeAPI


def check(report: RuntimeReport, settings: Any) -> None:
    """The ``kubernetes`` package imports; the cluster of the ``kubeconfig`` and ``context``
    settings answers; pods can be listed in the ``namespace`` setting.

    Raises:
        SandboxUnavailable: the package is missing (the message names the pip extra).
    """
    from ..registry import require

    kubernetes = require("kubernetes")
    report.details.append(f"kubernetes client {kubernetes.__version__}")
    namespace = settings.namespace
    try:
        api = KubeAPI(namespace, settings.kubeconfig, settings.context, request_timeout=10)
    except SandboxError as e:
        report.ok = False
        report.details.append(str(e))
        report.fixes.append("point SANDBOX_K8S_KUBECONFIG (or 'kubeconfig' in the kernelspec) at a "
                            "kubeconfig file")
        return
    try:
        info = api.cluster_info()
        report.details.append(f"cluster {info.version} via {api.source}")
        api.list_pods("sandbox-kernels/kernel-id")
        report.details.append(f"namespace {namespace}: pods can be listed")
    except SandboxError as e:
        report.ok = False
        report.details.append(str(e))
        report.fixes.append("check the kubeconfig's server, credentials and SANDBOX_K8S_NAMESPACE")
    finally:
        api.close()
