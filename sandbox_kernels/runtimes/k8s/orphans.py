"""The Kubernetes runtime's leftovers: kernel pods and their NetworkPolicies whose owner ran on
this host and is gone (``reap``), and kernel objects left in the cluster (test sessions)."""

from __future__ import annotations

import shutil
import socket
import subprocess

from ... import labels
from ...errors import SandboxError
from ...reap import Orphan, OrphanFinder

_SELECTOR = f"{labels.PREFIX}/kernel-id"


class KubernetesOrphans(OrphanFinder):
    """Objects in the settings' ``namespace`` of the cluster its ``kubeconfig``/``context`` name."""

    def orphans(self) -> list[Orphan]:
        """Pods and NetworkPolicies of dead owners of this host (a policy is listed on its own
        too: it outlives a pod deleted by hand). Nothing when no Kubernetes configuration
        exists or the cluster does not answer."""
        from .manifest import k8s_labels

        namespace = self.settings.namespace
        try:
            from .api import KubeAPI

            api = KubeAPI(namespace, self.settings.kubeconfig, self.settings.context, request_timeout=10)
            pods = api.list_pods(_SELECTOR)
            policies = api.list_network_policies(_SELECTOR)
        except SandboxError:
            return []
        here = k8s_labels({labels.OWNER_HOST: socket.gethostname()})[f"{labels.PREFIX}/owner-host"]
        found = []
        for kind, items, delete in (("pod", pods, api.delete_pod),
                                    ("network policy", policies, api.delete_network_policy)):
            for item in items:
                item_labels = item.metadata.labels or {}
                if item_labels.get(f"{labels.PREFIX}/owner-host") != here:
                    continue  # another host's: never ours to judge
                owner = {labels.OWNER_HOST: socket.gethostname(),
                         labels.OWNER_PID: item_labels.get(f"{labels.PREFIX}/owner-pid", "0")}
                if not labels.owner_alive(owner):
                    name = item.metadata.name
                    found.append(Orphan(kind, f"{namespace}/{name}", lambda name=name, delete=delete: delete(name),
                                        item_labels.get(f"{labels.PREFIX}/kernel-id", "")))
        return found

    def existing(self) -> set[str]:
        """None: a pod's kernel keeps its local directory through its live control socket."""
        return set()

    def leaks(self, session: str) -> dict[str, list[str]]:
        """Kernel pods and NetworkPolicies in any namespace, as namespace/name (only when a
        ``kubeconfig`` is set, as the test cluster's fixture does, and kubectl is on PATH)."""
        return {"pods": self._objects("pods"), "network policies": self._objects("networkpolicies")}

    def remove_leaks(self, leaks: dict[str, list[str]]) -> None:
        """``kubectl delete`` without waiting."""
        for kind, key in (("pods", "pods"), ("networkpolicies", "network policies")):
            for item in leaks.get(key, []):
                namespace, _, name = item.partition("/")
                subprocess.run(["kubectl", "--kubeconfig", self.settings.kubeconfig, "-n", namespace,
                                "delete", kind, name, "--wait=false"], capture_output=True, timeout=60)

    def _objects(self, kind: str) -> list[str]:
        kubeconfig = self.settings.kubeconfig
        if not (kubeconfig and shutil.which("kubectl")):
            return []
        out = subprocess.run(
            ["kubectl", "--kubeconfig", kubeconfig, "get", kind, "-A", "-l", _SELECTOR,
             "-o", "custom-columns=NS:.metadata.namespace,NAME:.metadata.name", "--no-headers"],
            capture_output=True, text=True, timeout=30)
        rows = [line.split() for line in out.stdout.splitlines()] if out.returncode == 0 else []
        return [f"{row[0]}/{row[1]}" for row in rows if len(row) == 2]
