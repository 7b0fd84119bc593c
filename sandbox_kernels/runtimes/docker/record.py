"""The Docker runtime's record: what ``doctor``, ``reap``, the CLI and the server know of it."""

from ..registry import RuntimeRecord

RECORD = RuntimeRecord(
    package=__package__,
    display_name="Python (Docker)",
    provisioner=".provisioner:DockerProvisioner",
    orphans=".orphans:DockerOrphans",
    image=".image:build_docker_image",
    options={"memory": "memory", "cpus": "cpus", "image": "image"},
)
