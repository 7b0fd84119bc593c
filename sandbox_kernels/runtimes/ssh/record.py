"""The SSH-host runtime's record: what ``doctor``, ``reap``, the CLI and the server know of it."""

from ..registry import RuntimeRecord

RECORD = RuntimeRecord(
    package=__package__,
    display_name="Python (SSH host)",
    provisioner=".provisioner:SSHHostProvisioner",
    orphans=".orphans:SSHOrphans",
    options={"host": "host"},
)
