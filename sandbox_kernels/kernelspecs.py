"""Install the kernelspec templates shipped in ``kernelspecs/``."""

from __future__ import annotations

import sys
from pathlib import Path

from jupyter_client.kernelspec import KernelSpecManager

from .errors import SandboxNotFound


def templates_dir() -> Path:
    """The templates: inside the wheel (``_kernelspecs``) or the source tree (``kernelspecs``)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_kernelspecs", here.parent / "kernelspecs"):
        if candidate.is_dir():
            return candidate
    raise SandboxNotFound("the kernelspec templates are missing from this installation; reinstall sandbox-kernels.")


def available() -> list[str]:
    """Names of the kernelspecs this installation ships."""
    return sorted(p.name for p in templates_dir().iterdir() if (p / "kernel.json").is_file())


def install(names: list[str] | None = None, *, user: bool = False, prefix: str | None = None) -> list[str]:
    """Install kernelspecs (all by default) for the user, into ``prefix``, or system-wide.

    Returns:
        The directories written.

    Raises:
        SandboxNotFound: a name that is not shipped.
    """
    shipped = available()
    names = names or shipped
    unknown = sorted(set(names) - set(shipped))
    if unknown:
        raise SandboxNotFound(f"no kernelspec named {', '.join(unknown)}; shipped: {', '.join(shipped)}")
    ksm = KernelSpecManager()
    return [
        ksm.install_kernel_spec(str(templates_dir() / name), kernel_name=name, user=user, prefix=prefix)
        for name in names
    ]


def sys_prefix() -> str:
    """The prefix of the running Python environment (for ``--sys-prefix``)."""
    return sys.prefix
