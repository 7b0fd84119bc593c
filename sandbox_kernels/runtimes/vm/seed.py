"""The seed disk: per-VM credentials and settings read by the guest at boot.

The seed is a plain tar archive written straight onto a small raw disk (no filesystem), which
the guest finds by its virtio serial ``sandbox-seed`` and unpacks with ``tar -xf /dev/vdX``.
Members (all regular files, mode 0600, owned by root):

``ssh_host_ed25519_key``
    the private host key sshd serves; the provisioner pins its public half.
``authorized_keys``
    the client public key allowed to log in as ``executor``.
``hostname``
    the guest's host name (one line).
``network``
    present only when the sandbox may open outbound connections.
``random_seed``
    32 bytes the guest mixes into ``/dev/urandom``.
``workspace``
    present only when a workspace disk (serial ``sandbox-workspace``) is attached.

The file holds secrets: it is created with mode 0600 and never widened.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from pathlib import Path

from ...errors import SandboxConfigError
from ...private_dirs import write_private_file

SECTOR = 512
#: Every seed disk has this size: a VM restored from a golden snapshot keeps the disk size the
#: golden VM's kernel saw, so its own seed must fit the same disk.
SEED_SIZE = 64 * 1024
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_MEMBERS = ("ssh_host_ed25519_key", "authorized_keys", "hostname", "network", "random_seed",
            "workspace")


def check_hostname(hostname: str) -> str:
    """Check a guest host name: one DNS label (letters, digits, inner dashes), at most 63.

    Raises:
        SandboxConfigError: the name is not a valid single-label host name.
    """
    if not isinstance(hostname, str) or not _HOSTNAME.fullmatch(hostname):
        raise SandboxConfigError(
            f"guest hostname {hostname!r} is not allowed: use 1-63 letters, digits or '-', "
            "starting and ending with a letter or digit."
        )
    return hostname


def write_seed_disk(
    path: str | os.PathLike[str],
    host_key_openssh: str,
    authorized_keys: str,
    hostname: str,
    allow_network: bool = False,
    random_seed: bytes = b"",
    workspace: bool = False,
) -> Path:
    """Write the seed disk image to ``path`` (mode 0600, ``SEED_SIZE`` bytes). Every value is
    checked before the file is opened.

    Args:
        path: the raw disk file to create or replace; symbolic links are refused.
        host_key_openssh: the guest's private host key, OpenSSH format.
        authorized_keys: the client public key line(s).
        hostname: the guest host name (one DNS label).
        allow_network: let the guest open outbound connections (default route and DNS).
        random_seed: 32 random bytes for the guest's entropy pool (``b""``: none).
        workspace: a workspace disk with serial ``sandbox-workspace`` is attached.

    Returns:
        The path written.

    Raises:
        SandboxConfigError: a bad host name, a host key that is not an OpenSSH private key,
            authorized keys that are empty or not text, a random seed of the wrong size, a
            seed larger than the disk, or the file cannot be written.
    """
    if "-----BEGIN OPENSSH PRIVATE KEY-----" not in host_key_openssh:
        raise SandboxConfigError("the seed's host key must be an OpenSSH private key "
                                 "(-----BEGIN OPENSSH PRIVATE KEY-----).")
    if not authorized_keys.strip() or "\0" in authorized_keys:
        raise SandboxConfigError("the seed's authorized_keys must hold at least one public key.")
    if random_seed and len(random_seed) != 32:
        raise SandboxConfigError(f"the seed's random_seed must be 32 bytes, not {len(random_seed)}.")
    files: dict[str, bytes] = {
        "ssh_host_ed25519_key": _with_newline(host_key_openssh).encode("ascii"),
        "authorized_keys": _with_newline(authorized_keys).encode("utf-8"),
        "hostname": f"{check_hostname(hostname)}\n".encode("ascii"),
    }
    if allow_network:
        files["network"] = b"1\n"
    if random_seed:
        files["random_seed"] = bytes(random_seed)
    if workspace:
        files["workspace"] = b"1\n"
    return write_private_file(path, _disk_image(files), "the seed disk")


def _disk_image(files: dict[str, bytes]) -> bytes:
    """``files`` as a tar archive of root's 0600 members, padded to ``SEED_SIZE``.

    Raises:
        SandboxConfigError: the archive is larger than the disk.
    """
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o600
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            tar.addfile(info, io.BytesIO(data))
    data = buffer.getvalue()
    if len(data) > SEED_SIZE:
        raise SandboxConfigError(f"the seed is {len(data)} bytes, more than the seed disk's "
                                 f"{SEED_SIZE}: use shorter authorized_keys.")
    return data + b"\0" * (SEED_SIZE - len(data))


def refresh_random_seed(path: str | os.PathLike[str], random_seed: bytes) -> None:
    """Give a VM's seed disk new random bytes, keeping everything else (keys, host name).

    A memory rollback returns the guest's random generator to the snapshot's state: before
    the guest reseeds from its seed disk, the disk gets fresh bytes, so two rollbacks to one
    snapshot do not hand out the same random numbers.

    Raises:
        SandboxConfigError: the file is not a seed disk, or cannot be written.
    """
    members = read_seed(path)
    write_seed_disk(path, members["ssh_host_ed25519_key"].decode("ascii"),
                    members["authorized_keys"].decode("utf-8"), members["hostname"].decode("ascii").strip(),
                    "network" in members, random_seed, "workspace" in members)


def read_seed(path: str | os.PathLike[str]) -> dict[str, bytes]:
    """Read a seed disk back (tests and ``image check`` diagnostics): member name -> content.

    Raises:
        SandboxConfigError: the file is not a seed archive.
    """
    try:
        with tarfile.open(path, mode="r:") as tar:
            found = {}
            for member in tar.getmembers():
                if not member.isfile() or member.name not in _MEMBERS:
                    raise SandboxConfigError(f"unexpected member {member.name!r} in seed {path}")
                extracted = tar.extractfile(member)
                assert extracted is not None
                found[member.name] = extracted.read()
            return found
    except tarfile.TarError as e:
        raise SandboxConfigError(f"{os.fspath(path)} is not a seed archive: {e}") from e


def _with_newline(text: str) -> str:
    return text if text.endswith("\n") else text + "\n"
