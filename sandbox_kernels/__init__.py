"""Jupyter kernels in sandboxes: NixOS/libvirt VMs, Docker containers, Kubernetes pods, SSH hosts."""

__version__ = "0.1.0"
