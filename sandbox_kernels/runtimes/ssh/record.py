"""The SSH-host runtime's record: what ``doctor``, ``reap``, the CLI and the server know of it."""

from ..registry import RuntimeRecord

RECORD = RuntimeRecord(
    name="ssh",
    kernel_name="sandbox-ssh",
    display_name="Python (SSH host)",
    provisioner="sandbox_kernels.runtimes.ssh.provisioner:SSHHostProvisioner",
    extra="ssh",
    doctor="sandbox_kernels.runtimes.ssh.doctor:check",
    orphans="sandbox_kernels.runtimes.ssh.orphans:SSHOrphans",
    options={"host": "host"},
)
