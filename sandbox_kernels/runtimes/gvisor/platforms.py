"""Choose the gVisor platform a kernel runs on: one of the Docker runtimes the set-up registered.

The setting is ``auto``, ``ptrace``, ``kvm`` or ``systrap`` (``systrap`` exists in runsc builds
from 2023 on). The set-up (:mod:`.engine_config`) registers ``runsc-<platform>`` with the Docker
engine only for the platforms a probe found working on this host, so "registered" is the
evidence that a platform works here; ``kvm`` is additionally refused without ``/dev/kvm`` or on
a host running paravirtual KVM (``/sys/module/kvm_pvm``), where gVisor's KVM platform hangs.

``auto`` takes the first usable of ``kvm``, ``systrap``, ``ptrace``. An explicit platform that
is not usable falls back the same way, with a WARNING that names the setting (as the VM runtime
does when KVM is asked for and TCG is used).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...errors import SandboxUnavailable
from .engine_config import RUNTIME_PREFIX, runtime_name

PLATFORMS = ("ptrace", "kvm", "systrap")
SETTINGS = ("auto", *PLATFORMS)
AUTO_ORDER = ("kvm", "systrap", "ptrace")
SETTING_HELP = "c.GVisorProvisioner.platform or SANDBOX_GVISOR_PLATFORM"
_KVM = Path("/dev/kvm")
_KVM_PVM = Path("/sys/module/kvm_pvm")


@dataclass(frozen=True)
class PlatformChoice:
    """The platform to run on, its Docker runtime, and why.

    Attributes:
        platform: ``ptrace``, ``kvm`` or ``systrap``.
        runtime: the Docker runtime name (``runsc-ptrace``).
        reason: one sentence for logs and ``doctor``.
        fallback: True when the setting asked for another platform (the caller warns).
    """

    platform: str
    runtime: str
    reason: str
    fallback: bool = False


def registered_platforms(runtimes: dict[str, object] | list[str]) -> list[str]:
    """The gVisor platforms among the Docker engine's runtimes (``docker info``'s ``Runtimes``)."""
    return [name[len(RUNTIME_PREFIX):] for name in runtimes
            if name.startswith(RUNTIME_PREFIX) and name[len(RUNTIME_PREFIX):] in PLATFORMS]


def kvm_problem(kvm: Path = _KVM, kvm_pvm: Path = _KVM_PVM) -> str:
    """Why gVisor's KVM platform cannot work on this host, or "" if nothing says it cannot."""
    if not kvm.exists():
        return f"{kvm} does not exist"
    if kvm_pvm.exists():
        return "the host runs paravirtual KVM (kvm_pvm), where gVisor's KVM platform hangs"
    return ""


def choose_platform(setting: str, registered: list[str], kvm: str | None = None) -> PlatformChoice:
    """Decide the platform (see the module docstring).

    Args:
        setting: ``auto`` or a platform name.
        registered: platforms registered with the Docker engine (:func:`registered_platforms`).
        kvm: :func:`kvm_problem`'s answer (computed when None).

    Raises:
        SandboxUnavailable: no gVisor platform is registered with the Docker engine.
    """
    if setting not in SETTINGS:  # the trait validates first; this is a programming error
        raise ValueError(f"unknown gVisor platform setting {setting!r}")
    kvm = kvm_problem() if kvm is None else kvm

    def why_not(platform: str) -> str:
        if platform not in registered:
            return (f"no Docker runtime {runtime_name(platform)} is registered (the set-up "
                    f"registers only the platforms that work on this host)")
        if platform == "kvm" and kvm:
            return kvm
        return ""

    usable = [p for p in AUTO_ORDER if not why_not(p)]
    if not usable:
        raise SandboxUnavailable(
            "gVisor is not registered with the Docker engine (no working runsc-<platform> "
            "runtime): install runsc and register it with `scripts/setup.sh` (or, as root, "
            "`python -m sandbox_kernels.runtimes.gvisor.engine_config`).")
    if setting == "auto":
        return PlatformChoice(usable[0], runtime_name(usable[0]),
                              f"platform 'auto': {usable[0]} (usable here: {', '.join(usable)})")
    problem = why_not(setting)
    if not problem:
        return PlatformChoice(setting, runtime_name(setting), f"platform {setting!r} as set")
    return PlatformChoice(
        usable[0], runtime_name(usable[0]),
        f"gVisor platform {setting!r} ({SETTING_HELP}) does not work here: {problem}; "
        f"using {usable[0]!r} instead", fallback=True)
