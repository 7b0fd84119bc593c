"""The SSH-host runtime's leftovers: none it can judge from here.

``reap`` lists nothing on SSH hosts (it would need each host's address and credentials, which
only kernelspecs hold); the kernel's local state directory is a shared one, handled by
:mod:`sandbox_kernels.reap` itself.
"""

from __future__ import annotations

from ...reap import Orphan, OrphanFinder


class SSHOrphans(OrphanFinder):
    """Nothing beyond the shared state directories."""

    def orphans(self) -> list[Orphan]:
        """None (see the module docstring)."""
        return []

    def existing(self) -> set[str]:
        """None: an SSH kernel keeps its local directory through its live control socket."""
        return set()

    def leaks(self, session: str) -> dict[str, list[str]]:
        """None: nothing of an SSH kernel is labelled on this host (the test hosts are the tests' own)."""
        return {}

    def remove_leaks(self, leaks: dict[str, list[str]]) -> None:
        """Nothing to remove."""
