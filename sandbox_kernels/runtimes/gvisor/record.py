"""The gVisor runtime's record: what ``doctor``, ``reap``, the CLI and the server know of it."""

from ..registry import RuntimeRecord

RECORD = RuntimeRecord(
    name="gvisor",
    kernel_name="sandbox-gvisor",
    display_name="Python (gVisor)",
    provisioner="sandbox_kernels.runtimes.gvisor.provisioner:GVisorProvisioner",
    extra="docker",
    doctor="sandbox_kernels.runtimes.gvisor.doctor:check",
    # Its sandboxes are Docker containers labelled as ours: the Docker finder finds them.
    orphans="sandbox_kernels.runtimes.docker.orphans:DockerOrphans",
    options={"memory": "memory", "cpus": "cpus", "image": "image"},
)
