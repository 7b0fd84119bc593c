"""SSH to sandboxes: per-sandbox keys, one pinned-host-key connection, port forwards, commands.

Import the pieces from their modules (``sandbox_kernels.ssh.tunnel.SSHTunnel``, ...) or from
here; nothing connects or reads files at import time.
"""

from __future__ import annotations

from .keys import (
    KeyPair,
    SandboxKeys,
    create_sandbox_keys,
    generate_keypair,
    known_host_keys,
    load_private_key,
    parse_public_key,
    write_private_key,
    write_public_key,
)
from .processes import CommandResult, ProcessStatus
from .tunnel import SSHTunnel

__all__ = [
    "CommandResult",
    "KeyPair",
    "ProcessStatus",
    "SSHTunnel",
    "SandboxKeys",
    "create_sandbox_keys",
    "generate_keypair",
    "known_host_keys",
    "load_private_key",
    "parse_public_key",
    "write_private_key",
    "write_public_key",
]
