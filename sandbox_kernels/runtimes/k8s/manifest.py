"""The kernel's pod, built as plain Python data (never by string templating of user values).

The pod runs a tiny init (PID 1: reaps orphans, exits on SIGTERM) as the image's unprivileged
user; the kernel itself is started later by exec, so a restart replaces the kernel process
and keeps the pod. Nothing is exposed: the kernel binds the pod's 127.0.0.1 and is reached
through the API server's port-forward.
"""

from __future__ import annotations

import re
from typing import Any

from ...labels import PREFIX

CONTAINER = "kernel"
SANDBOX_UID = 1000  # the image's `executor` user

# PID 1 in the pod: reap every child (the kernel's wrapper is re-parented here) until SIGTERM.
INIT_SCRIPT = """\
import os, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
while True:
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(1)
"""

_LABEL_VALUE = re.compile(r"[^A-Za-z0-9_.-]")


def k8s_labels(labels: dict[str, str]) -> dict[str, str]:
    """Turn our Docker-style labels (``sandbox-kernels.kernel-id``) into Kubernetes labels
    (``sandbox-kernels/kernel-id``) with values cut to what a label value may hold."""
    result = {}
    for key, value in labels.items():
        if key.startswith(f"{PREFIX}."):
            key = f"{PREFIX}/{key[len(PREFIX) + 1:]}"
        value = _LABEL_VALUE.sub("-", value)[:63].strip("-_.")
        result[key] = value
    return result


def pod_manifest(
    *,
    name: str,
    labels: dict[str, str],
    image: str,
    image_pull_policy: str,
    python: str,
    resources: dict[str, dict[str, str]],
    node_selector: dict[str, str],
    tolerations: list[dict[str, Any]],
    service_account: str,
    automount_token: bool,
    seccomp: bool,
    ephemeral_storage: str = "",
    runtime_class_name: str = "",
) -> dict[str, Any]:
    """The pod for one kernel.

    Args:
        name: the pod name.
        labels: Kubernetes labels (see :func:`k8s_labels`).
        image: an image with ``python3`` and ``ipykernel`` and a user of uid 1000.
        image_pull_policy: ``Always``, ``IfNotPresent`` or ``Never``.
        python: the interpreter that runs PID 1 in the pod.
        resources: ``{"requests": {...}, "limits": {...}}`` with ``cpu``/``memory``.
        node_selector: node labels the pod must land on.
        tolerations: tolerations as Kubernetes dicts.
        service_account: the service account name ('' for the namespace's default).
        automount_token: whether its token is mounted.
        seccomp: whether to ask for the runtime's default seccomp profile (1.19+).
        ephemeral_storage: the container's ``ephemeral-storage`` limit (its writable layer
            and logs; past it the kubelet evicts the pod) unless ``resources`` sets one;
            '' for none.
        runtime_class_name: the pod's ``runtimeClassName`` (a RuntimeClass such as gVisor or
            Kata); '' for the cluster's default runtime.

    Returns:
        A dict ready for ``create_namespaced_pod``.
    """
    pod_security: dict[str, Any] = {
        "runAsNonRoot": True,
        "runAsUser": SANDBOX_UID,
        "runAsGroup": SANDBOX_UID,
    }
    container_security: dict[str, Any] = {
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
    }
    if seccomp:
        pod_security["seccompProfile"] = {"type": "RuntimeDefault"}
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": automount_token,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 5,
        "securityContext": pod_security,
        "containers": [{
            "name": CONTAINER,
            "image": image,
            "imagePullPolicy": image_pull_policy,
            "command": [python, "-c", INIT_SCRIPT],
            "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}],
            "resources": _resources(resources, ephemeral_storage),
            "securityContext": container_security,
        }],
    }
    if node_selector:
        spec["nodeSelector"] = dict(node_selector)
    if tolerations:
        spec["tolerations"] = [dict(t) for t in tolerations]
    if service_account:
        spec["serviceAccountName"] = service_account
    if runtime_class_name:
        spec["runtimeClassName"] = runtime_class_name
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": dict(labels)},
        "spec": spec,
    }


def _resources(resources: dict[str, dict[str, str]], ephemeral_storage: str) -> dict[str, Any]:
    result = {k: dict(v) for k, v in resources.items() if v}
    if ephemeral_storage:
        result.setdefault("limits", {}).setdefault("ephemeral-storage", ephemeral_storage)
    return result


def network_policy_manifest(*, name: str, labels: dict[str, str], kernel_label: str) -> dict[str, Any]:
    """A NetworkPolicy that denies the kernel's pod all traffic, in and out.

    It selects the pod by its kernel-id label and lists both policy types with no rule, which
    Kubernetes reads as "nothing allowed". The API server's port-forward reaches the pod's
    127.0.0.1 through the kubelet, inside the pod's network namespace, so it is not affected.
    Enforced only where the cluster's network plugin enforces NetworkPolicies.

    Args:
        name: the policy's name (the pod's).
        labels: its labels (the pod's, so ``reap`` and leak checks find it).
        kernel_label: the ``<prefix>/kernel-id`` label key; its value in ``labels`` selects.

    Returns:
        A dict ready for ``create_namespaced_network_policy``.
    """
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "labels": dict(labels)},
        "spec": {
            "podSelector": {"matchLabels": {kernel_label: labels[kernel_label]}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [],
            "egress": [],
        },
    }
