"""Doctor checks for the libvirt (VM) runtime."""

from __future__ import annotations

import os
from typing import Any

from ...doctor import RuntimeReport
from ...errors import SandboxError


def check(report: RuntimeReport, settings: Any) -> None:
    """libvirt-python, libvirtd (``settings.libvirt_uri``), the base image (``base_image``),
    and the accelerator the ``accelerator`` setting picks (KVM vs TCG)."""
    from .accel import choose_domain_type
    from .libvirt_conn import LibvirtHost

    image = settings.base_image
    try:
        with LibvirtHost(settings.libvirt_uri) as host:
            host.connect()
            report.details.append(f"libvirtd reachable at {settings.libvirt_uri}")
    except SandboxError as e:
        report.ok = False
        report.details.append(str(e))
        report.fixes.append("apt-get install libvirt-daemon-system qemu-system-x86 && virtlogd -d && libvirtd -d")
    if os.path.exists(image):
        from ...images.guest_os import guest_os

        report.details.append(f"base image {image}")
        report.details.append(f"guest OS: {guest_os(image).describe()}")
    else:
        report.ok = False
        report.details.append(f"base image {image} missing")
        report.fixes.append("sandbox-kernels image build vm (or set NIXOS_SANDBOX_BASE_IMAGE)")
    from .outbound import problem

    missing = problem()
    report.details.append(f"allow_network: {'unavailable: ' + missing if missing else 'ready'} "
                          "(outbound NIC through passt, kept off this machine by nftables)")
    kernel = settings.guest_kernel or os.path.splitext(image)[0] + ".vmlinuz"
    try:
        choice = choose_domain_type(settings.accelerator, kernel if os.path.exists(kernel) else None)
        report.details.append(f"accelerator: {choice.domain_type} ({choice.reason})")
    except SandboxError as e:
        report.details.append(f"accelerator: {e}")
