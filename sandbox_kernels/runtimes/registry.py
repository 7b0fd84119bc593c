"""Runtimes by name, imported lazily, with actionable messages for missing dependencies.

Like fsspec's registry: nothing is imported until a runtime is asked for, and a missing
optional package becomes "install sandbox-kernels[libvirt]", never an ImportError traceback.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from ..errors import SandboxUnavailable


@dataclass(frozen=True)
class Runtime:
    """Where a runtime lives and what it needs."""

    name: str
    kernel_name: str
    display_name: str
    target: str  # "module:Class"
    extra: str  # pip extra that brings its Python dependencies


RUNTIMES: dict[str, Runtime] = {
    r.name: r
    for r in (
        Runtime("docker", "sandbox-docker", "Python (Docker)",
                "sandbox_kernels.runtimes.docker.provisioner:DockerProvisioner", "docker"),
        Runtime("libvirt", "sandbox-nixos-vm", "Python (NixOS VM)",
                "sandbox_kernels.runtimes.vm.provisioner:LibvirtProvisioner", "libvirt"),
        Runtime("k8s", "sandbox-k8s", "Python (Kubernetes)",
                "sandbox_kernels.runtimes.k8s.provisioner:KubernetesProvisioner", "kubernetes"),
        Runtime("ssh", "sandbox-ssh", "Python (SSH host)",
                "sandbox_kernels.runtimes.ssh.provisioner:SSHHostProvisioner", "ssh"),
    )
}

_PACKAGE_EXTRA = {"docker": "docker", "libvirt": "libvirt", "kubernetes": "kubernetes",
                  "paramiko": "ssh"}


def require(module: str, extra: str | None = None) -> ModuleType:
    """Import an optional dependency or explain how to install it.

    Raises:
        SandboxUnavailable: the package is not installed; the message names the pip extra.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        extra = extra or _PACKAGE_EXTRA.get(module.split(".")[0], "all")
        raise SandboxUnavailable(
            f"the Python package {module!r} is not installed: "
            f"`pip install 'sandbox-kernels[{extra}]'` (or `make demo`)."
        ) from e


def load(name: str) -> Any:
    """The provisioner class of runtime ``name``.

    Raises:
        SandboxUnavailable: unknown runtime, or its dependencies are missing.
    """
    try:
        runtime = RUNTIMES[name]
    except KeyError:
        raise SandboxUnavailable(
            f"unknown runtime {name!r}; known: {', '.join(RUNTIMES)}"
        ) from None
    module_name, _, cls = runtime.target.partition(":")
    module = require(module_name, runtime.extra)
    return getattr(module, cls)
