"""The VM (libvirt/QEMU) runtime's record: what ``doctor``, ``reap``, the CLI and the server
know of it. Users type ``vm`` for it; labels and state directories say ``libvirt``."""

from ..registry import RuntimeRecord

RECORD = RuntimeRecord(
    name="libvirt",
    alias="vm",
    kernel_name="sandbox-nixos-vm",
    display_name="Python (NixOS VM)",
    provisioner="sandbox_kernels.runtimes.vm.provisioner:LibvirtProvisioner",
    extra="libvirt",
    doctor="sandbox_kernels.runtimes.vm.doctor:check",
    orphans="sandbox_kernels.runtimes.vm.orphans:VMOrphans",
    image="sandbox_kernels.runtimes.vm.image:build_vm_image",
    commands="sandbox_kernels.runtimes.vm.golden_cli:add_parser",
    options={"memory": "memory_mb", "cpus": "vcpus", "image": "base_image"},
)
