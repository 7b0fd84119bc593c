"""The Kubernetes runtime's record: what ``doctor``, ``reap``, the CLI and the server know of it."""

from ..registry import RuntimeRecord

RECORD = RuntimeRecord(
    name="k8s",
    kernel_name="sandbox-k8s",
    display_name="Python (Kubernetes)",
    provisioner="sandbox_kernels.runtimes.k8s.provisioner:KubernetesProvisioner",
    extra="kubernetes",
    doctor="sandbox_kernels.runtimes.k8s.doctor:check",
    orphans="sandbox_kernels.runtimes.k8s.orphans:KubernetesOrphans",
    options={"memory": "resources", "cpus": "resources", "image": "image"},
    reap_options={
        "namespace": "Kubernetes namespace of kernel pods (default: the setting, i.e. "
                     "SANDBOX_K8S_NAMESPACE, else 'default')",
        "kubeconfig": "kubeconfig of the cluster (default: the setting, i.e. "
                      "SANDBOX_K8S_KUBECONFIG, $KUBECONFIG, ~/.kube/config)",
    },
)
