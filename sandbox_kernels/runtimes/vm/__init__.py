"""The pieces of a libvirt/QEMU sandbox: seed disk, domain XML, overlays, accelerator, libvirt."""
