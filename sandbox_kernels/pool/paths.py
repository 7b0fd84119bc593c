"""Where the pool agent lives: ``<state_root>/pool/`` (0700), with its socket, lock and log."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import SandboxConfigError
from ..private_dirs import open_private_dir
from ..settings import default_state_root

_MAX_UNIX_PATH = 107


@dataclass(frozen=True)
class AgentPaths:
    """The agent's files under one state root."""

    root: Path

    @classmethod
    def for_state_root(cls, state_root: str | None = None) -> AgentPaths:
        """The paths for ``state_root`` (default: the state root of this environment)."""
        return cls(Path(state_root or default_state_root()) / "pool")

    @property
    def socket(self) -> Path:
        """The agent's unix socket."""
        return self.root / "agent.sock"

    @property
    def lock(self) -> Path:
        """Held (flock) by the running agent: one per state root."""
        return self.root / "agent.lock"

    @property
    def starting(self) -> Path:
        """Present while a process starts the agent (see ``PoolClient.start_agent``)."""
        return self.root / "starting"

    @property
    def log(self) -> Path:
        """The log of an agent started on demand."""
        return self.root / "agent.log"

    def ensure(self) -> None:
        """Create the directory (0700, ours alone) and check the socket path fits.

        Raises:
            SandboxUnavailable: the directory (or its parent) is not this user's alone.
            SandboxConfigError: the socket path is too long for a unix socket.
        """
        hint = "Set SANDBOX_KERNELS_STATE_DIR (or XDG_RUNTIME_DIR) to a directory of this user's."
        os.close(open_private_dir(self.root.parent, "the state directory (state_root)", hint))
        os.close(open_private_dir(self.root, "the pool agent's directory", hint))
        if len(str(self.socket).encode()) > _MAX_UNIX_PATH:
            raise SandboxConfigError(
                f"the pool agent's socket path {self.socket} is longer than a unix socket "
                f"allows ({_MAX_UNIX_PATH} bytes); set state_root (SANDBOX_KERNELS_STATE_DIR) "
                "to a shorter directory.")
