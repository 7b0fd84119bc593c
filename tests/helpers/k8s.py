"""The test Kubernetes cluster (tests/infra/k8s): a session fixture and small API helpers.

Registered as a plugin in tests/conftest.py, so every module (tests/test_k8s.py,
tests/hostile/test_k8s.py) shares one ``k8s_cluster`` without importing a test module.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest

INFRA = Path(__file__).resolve().parent.parent / "infra" / "k8s"
NAMESPACE = "sandbox-kernels-test"
LABEL = "sandbox-kernels/kernel-id"


def cluster_up(kubeconfig: Path) -> bool:
    if not kubeconfig.is_file():
        return False
    try:
        from kubernetes import client, config

        api = client.VersionApi(config.new_client_from_config(str(kubeconfig)))
        api.get_code(_request_timeout=5)
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def k8s_cluster() -> Iterator[str]:
    """The test cluster's kubeconfig; brings the cluster up (building it on a cold machine)
    unless it already runs, and tears it down at the end if this session started it.

    Sets what the ``sandbox-k8s`` kernelspec needs (also for papermill subprocesses):
    SANDBOX_K8S_KUBECONFIG, SANDBOX_K8S_NAMESPACE, SANDBOX_K8S_IMAGE_PULL_POLICY=Never.
    """
    if os.geteuid() != 0:
        pytest.skip("the test cluster needs root (kubelet, Docker)")
    pytest.importorskip("kubernetes")
    run_dir = Path(os.environ.get("SANDBOX_K8S_RUN_DIR", "/tmp/sandbox-kernels-k8s"))
    reused = cluster_up(run_dir / "admin.kubeconfig")
    up = subprocess.run(["bash", str(INFRA / "up.sh")], capture_output=True, text=True,
                        timeout=float(os.environ.get("SANDBOX_K8S_BUILD_TIMEOUT", 1800)) + 300)
    if up.returncode != 0:
        pytest.fail(f"tests/infra/k8s/up.sh failed:\n{up.stderr[-4000:]}")
    kubeconfig = up.stdout.strip().splitlines()[-1]
    bin_dir = subprocess.run(["bash", str(INFRA / "build.sh")], capture_output=True, text=True,
                             check=True).stdout.strip()
    env = {
        "SANDBOX_KERNELS_TEST_KUBECONFIG": kubeconfig,
        "SANDBOX_K8S_KUBECONFIG": kubeconfig,
        "SANDBOX_K8S_NAMESPACE": NAMESPACE,
        "SANDBOX_K8S_IMAGE_PULL_POLICY": "Never",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",  # the cluster's kubectl
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield kubeconfig
        left = pods()
        if left:
            core().delete_collection_namespaced_pod(NAMESPACE, label_selector=LABEL, grace_period_seconds=0)
        policies = network_policies()
        for name in policies:
            networking().delete_namespaced_network_policy(name, NAMESPACE)
        assert not left and not policies, f"left behind: pods {left}, network policies {policies}"
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if not reused and os.environ.get("SANDBOX_K8S_KEEP_CLUSTER") != "1":
            down = subprocess.run(["bash", str(INFRA / "down.sh")], capture_output=True, text=True,
                                  timeout=300)
            assert down.returncode == 0, down.stderr[-3000:]


_CORE: Any = None


def core() -> Any:
    global _CORE
    if _CORE is None:
        from kubernetes import client, config

        _CORE = client.CoreV1Api(config.new_client_from_config(os.environ["SANDBOX_K8S_KUBECONFIG"]))
    return _CORE


def pods(kernel_id: str | None = None) -> list[str]:
    selector = f"{LABEL}={kernel_id}" if kernel_id else LABEL
    items = core().list_namespaced_pod(NAMESPACE, label_selector=selector).items
    return [p.metadata.name for p in items]


_NETWORKING: Any = None


def networking() -> Any:
    """The test cluster's NetworkingV1Api."""
    global _NETWORKING
    if _NETWORKING is None:
        from kubernetes import client, config

        _NETWORKING = client.NetworkingV1Api(config.new_client_from_config(os.environ["SANDBOX_K8S_KUBECONFIG"]))
    return _NETWORKING


def network_policies(kernel_id: str | None = None) -> list[str]:
    """Names of kernel NetworkPolicies in the test namespace (of one kernel, or all)."""
    selector = f"{LABEL}={kernel_id}" if kernel_id else LABEL
    return [p.metadata.name for p in networking().list_namespaced_network_policy(NAMESPACE, label_selector=selector).items]


def delete(kernel_id: str) -> None:
    for name in pods(kernel_id):
        core().delete_namespaced_pod(name, NAMESPACE, grace_period_seconds=0)
