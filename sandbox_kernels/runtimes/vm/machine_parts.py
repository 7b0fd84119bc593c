"""What a sandbox VM is made of: its settings, its keys, its domain description and its files.

:func:`.machine.assemble` turns a :class:`MachineConfig` and :class:`MachineKeys` into a
:class:`~.machine.Machine`; :func:`describe` is the domain such a machine runs as.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import paramiko

from ...errors import SandboxConfigError
from ...ssh.keys import load_private_key
from . import overlay
from .domain_xml import DomainSpec
from .image import boot_cmdline


@dataclass(frozen=True)
class MachineConfig:
    """What a sandbox VM is (everything but its keys).

    Attributes:
        machine_id: names the domain ``sandbox-kernels-<machine_id>`` (a kernel id).
        vm_dir: the VM's own directory: overlay, seed, console log, QEMU's sockets.
        base_image: the base qcow2 the overlay is backed by.
        kernel: the guest kernel for direct boot.
        initrd: its initrd, or None.
        hostname: the guest's host name (in the seed).
        accelerator: ``auto``, ``kvm`` or ``qemu`` (see :mod:`.accel`).
        memory_mib: guest memory (validated by the provisioner's trait).
        vcpus: guest CPUs.
        allow_network: give the guest its outbound NIC (passt).
        workspace: a workspace disk already created, or None.
        extra_cmdline: kernel command-line words after the image's own.
        labels: owner labels kept in the domain's metadata.
        persistent: define the domain before starting it (image checks).
    """

    machine_id: str
    vm_dir: Path
    base_image: str
    kernel: str
    initrd: str | None
    hostname: str
    accelerator: str = "auto"
    memory_mib: int = 512
    vcpus: int = 1
    allow_network: bool = False
    workspace: str | None = None
    extra_cmdline: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    persistent: bool = False


@dataclass(frozen=True)
class MachineKeys:
    """The SSH keys of one VM.

    Attributes:
        host_private: the guest's host key (OpenSSH private format), written to the seed.
        host_public: its public line, pinned by every login.
        authorized: the client public key line the guest authorizes for its user.
        client_path: the client private key file, or None when ``client`` is given.
        client: the client private key in memory (image checks), or None.
    """

    host_private: str = field(repr=False)
    host_public: str
    authorized: str
    client_path: str | None = None
    client: paramiko.PKey | None = field(default=None, repr=False)

    def client_key(self) -> paramiko.PKey:
        """The client private key (read from ``client_path`` if not in memory)."""
        if self.client is not None:
            return self.client
        if not self.client_path:
            raise SandboxConfigError("the VM has no client key")
        return load_private_key(self.client_path)


def describe(config: MachineConfig, domain_type: str, ssh_port: int) -> DomainSpec:
    """The domain of the machine ``config`` describes, with its files in ``config.vm_dir``."""
    vm_dir = config.vm_dir
    return DomainSpec(
        kernel_id=config.machine_id, domain_type=domain_type, memory_mib=config.memory_mib,
        vcpus=config.vcpus, kernel=str(config.kernel), initrd=config.initrd,
        root=str(vm_dir / "root.qcow2"), seed=str(vm_dir / "seed.img"),
        serial_log=str(vm_dir / "console.log"), ssh_port=ssh_port,
        allow_network=config.allow_network, workspace=config.workspace, labels=dict(config.labels),
        reseed_socket=str(vm_dir / "reseed.sock"),
        outbound_socket=str(vm_dir / "outbound.sock") if config.allow_network else None,
        extra_cmdline=boot_cmdline(config.base_image) + tuple(config.extra_cmdline),
        persistent=config.persistent,
    )


def remove_files(vm_dir: Path, keep_disks: bool = False) -> None:
    """Delete a VM's directory; ``keep_disks``: only its non-disk files (the seed holds the
    guest's keys), so kept snapshots survive. Blocks."""
    if not keep_disks:
        overlay.remove_images(vm_dir)
    elif vm_dir.is_dir():
        for entry in vm_dir.iterdir():
            if not entry.name.endswith(".qcow2"):
                entry.unlink(missing_ok=True)
