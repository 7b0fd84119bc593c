"""The error tree of sandbox-kernels.

Every error we raise derives from :class:`SandboxError`; each subclass also derives from the
builtin it resembles, so ``except TimeoutError`` catches :class:`SandboxTimeout` too.
Messages are written for a person: they name the setting or value at fault and say how to
fix it, because they reach notebook users through Jupyter's kernel start errors.
"""

from __future__ import annotations


class SandboxError(Exception):
    """Root of every error raised by sandbox-kernels."""


class SandboxConfigError(SandboxError, ValueError):
    """A setting (kernelspec config, Jupyter config, environment variable) is invalid."""


class SandboxTimeout(SandboxError, TimeoutError):
    """A step (image build, boot, kernel start, snapshot) did not finish in time."""


class SandboxConnectionError(SandboxError, ConnectionError):
    """The sandbox could not be reached (SSH, Docker engine, libvirtd, API server)."""


class HostKeyMismatch(SandboxConnectionError):
    """The SSH host key offered by a sandbox differs from the pinned one."""


class SandboxUnavailable(SandboxError, RuntimeError):
    """A runtime cannot work on this machine (missing daemon, package or device)."""


class SandboxNotFound(SandboxError, LookupError):
    """A sandbox, image, kernel or snapshot that was asked for does not exist."""


class SandboxStartError(SandboxError, RuntimeError):
    """The sandbox or the kernel in it failed to start."""


class SandboxQuotaExceeded(SandboxError, RuntimeError):
    """A per-kernel bound (snapshot count or bytes) would be exceeded; free space first."""
