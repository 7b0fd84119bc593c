"""The VM (libvirt/QEMU) runtime's record: what ``doctor``, ``reap``, the CLI and the server
know of it. Users type ``vm`` for it; labels and state directories say ``libvirt``."""

from ..registry import RuntimeRecord

RECORD = RuntimeRecord(
    name="libvirt",
    alias="vm",
    package=__package__,
    kernel_name="sandbox-nixos-vm",
    display_name="Python (NixOS VM)",
    provisioner=".provisioner:LibvirtProvisioner",
    orphans=".orphans:VMOrphans",
    image=".image:build_vm_image",
    commands=".golden_cli:add_parser",
    options={"memory": "memory_mb", "cpus": "vcpus", "image": "base_image"},
)
