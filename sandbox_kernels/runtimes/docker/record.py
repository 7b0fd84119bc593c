"""The Docker runtime's record: what ``doctor``, ``reap``, the CLI and the server know of it."""

from ..registry import RuntimeRecord

RECORD = RuntimeRecord(
    name="docker",
    kernel_name="sandbox-docker",
    display_name="Python (Docker)",
    provisioner="sandbox_kernels.runtimes.docker.provisioner:DockerProvisioner",
    extra="docker",
    doctor="sandbox_kernels.runtimes.docker.doctor:check",
    orphans="sandbox_kernels.runtimes.docker.orphans:DockerOrphans",
    image="sandbox_kernels.runtimes.docker.image:build_docker_image",
    options={"memory": "memory", "cpus": "cpus", "image": "image"},
)
