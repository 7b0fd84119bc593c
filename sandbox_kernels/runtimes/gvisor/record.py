"""The gVisor runtime's record: what ``doctor``, ``reap``, the CLI and the server know of it."""

from ..docker.record import RECORD as DOCKER

# Docker's variant: its sandboxes are Docker containers labelled as ours (the Docker finder
# finds them), with Docker's pip extra and kernelspec options.
RECORD = DOCKER.variant(
    package=__package__,
    display_name="Python (gVisor)",
    provisioner=".provisioner:GVisorProvisioner",
)
