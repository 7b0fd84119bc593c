"""Doctor checks for the Kubernetes runtime: is the client installed, is a cluster reachable."""

from __future__ import annotations

import os

from ...doctor import RuntimeReport
from ...errors import SandboxError
from .api import KubeAPI


def check(report: RuntimeReport) -> None:
    """The ``kubernetes`` package imports; the configured cluster answers; the namespace exists.

    Raises:
        SandboxUnavailable: the package is missing (the message names the pip extra).
    """
    from ..registry import require

    kubernetes = require("kubernetes")
    report.details.append(f"kubernetes client {kubernetes.__version__}")
    namespace = os.environ.get("SANDBOX_K8S_NAMESPACE") or "default"
    try:
        api = KubeAPI(namespace, os.environ.get("SANDBOX_K8S_KUBECONFIG", ""),
                      os.environ.get("SANDBOX_K8S_CONTEXT", ""), request_timeout=10)
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
