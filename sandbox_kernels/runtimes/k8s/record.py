"""The Kubernetes runtime's record: what ``doctor``, ``reap``, the CLI and the server know of it."""

from ..registry import RuntimeRecord

RECORD = RuntimeRecord(
    package=__package__,
    display_name="Python (Kubernetes)",
    provisioner=".provisioner:KubernetesProvisioner",
    extra="kubernetes",
    orphans=".orphans:KubernetesOrphans",
    options={"memory": "resources", "cpus": "resources", "image": "image"},
    reap_options={
        "namespace": "Kubernetes namespace of kernel pods (default: the setting, i.e. "
                     "SANDBOX_K8S_NAMESPACE, else 'default')",
        "kubeconfig": "kubeconfig of the cluster (default: the setting, i.e. "
                      "SANDBOX_K8S_KUBECONFIG, $KUBECONFIG, ~/.kube/config)",
    },
)
