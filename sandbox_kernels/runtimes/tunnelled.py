"""Kept until the VM provisioner imports :mod:`sandbox_kernels.remote.ssh_provisioner`."""

from __future__ import annotations

from ..remote.ssh_provisioner import SSHKernelProvisioner as TunnelledProvisioner

__all__ = ["TunnelledProvisioner"]
