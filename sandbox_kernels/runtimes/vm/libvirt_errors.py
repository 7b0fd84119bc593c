"""libvirt's errors in our error tree, with a message a person can act on.

Used by :class:`~.libvirt_conn.LibvirtHost` only: the one place that catches ``libvirtError``.
"""

from __future__ import annotations

from typing import Any

from ...errors import SandboxError, SandboxNotFound, SandboxStartError, SandboxTimeout, SandboxUnavailable

START_DAEMONS = "start it: `virtlogd -d && libvirtd -d` (or `systemctl start libvirtd`)"


def message(e: Any) -> str:
    """The text of a ``libvirtError``."""
    return str(e.get_error_message() or e).strip()


def lost_connection(libvirt: Any, e: Any) -> bool:
    """Whether ``e`` says the connection to libvirtd is gone."""
    return bool(e.get_error_code() in (libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_SYSTEM_ERROR)
                and e.get_error_domain() == libvirt.VIR_FROM_RPC)


def translate(libvirt: Any, e: Any, what: str, name: str = "") -> SandboxError:
    """``libvirtError`` ``e``, raised while doing ``what`` to domain ``name``, as our error."""
    code = e.get_error_code()
    text = f"{what}{f' ({name})' if name else ''}: {message(e)}"
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        return SandboxNotFound(f"{text}. The VM is gone (destroyed outside sandbox-kernels?).")
    if code == libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT:
        return SandboxNotFound(f"{text}. List snapshots to see which exist.")
    if code == libvirt.VIR_ERR_OPERATION_TIMEOUT:
        return SandboxTimeout(f"{text}. libvirtd or QEMU is busy; retry.")
    if lost_connection(libvirt, e):
        return SandboxUnavailable(f"{text}. Lost libvirtd; {START_DAEMONS}.")
    if code == libvirt.VIR_ERR_OPERATION_INVALID:
        return SandboxError(f"{text}. The VM is not in a state that allows this.")
    return SandboxError(text)


def start_error(error: SandboxError, e: Any) -> SandboxError:
    """A failed start: a plain error becomes a :class:`SandboxStartError`, with a hint when
    QEMU could not reach a file."""
    if type(error) is not SandboxError:
        return error
    hint = ""
    if "Permission denied" in message(e) or "Cannot access storage file" in message(e):
        hint = (". QEMU runs as another user under qemu:///system and must be able to reach "
                "every directory above the images; see NIXOS_EPHEMERAL_VM_IMAGES_DIR.")
    return SandboxStartError(f"{error}{hint}")
