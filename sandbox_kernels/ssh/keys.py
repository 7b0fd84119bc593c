"""SSH key material for sandboxes: fresh key pairs, private key files, pinned host keys.

Every sandbox gets its own Ed25519 client key (to log in) and its own Ed25519 host key (which
the guest's sshd presents and the tunnel pins). Keys live in a per-sandbox directory of mode
0700; files are created with mode 0600 from the start, never widened and narrowed afterwards.
Private key text is never logged and never part of a ``repr``.
"""

from __future__ import annotations

import io
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from .. import private_dirs
from ..errors import SandboxConfigError

_SANDBOX_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_RSA_HOST_KEY_ALGORITHMS = ("rsa-sha2-512", "rsa-sha2-256")

CLIENT_KEY_NAME = "client_ed25519"
HOST_KEY_NAME = "host_ed25519"


@dataclass(frozen=True)
class KeyPair:
    """An SSH key pair held in memory.

    Attributes:
        private_openssh: the private key in OpenSSH format (``-----BEGIN OPENSSH PRIVATE
            KEY-----``), unencrypted. Kept out of ``repr``.
        public_line: the public key as one ``authorized_keys`` / ``known_hosts`` line,
            ``ssh-ed25519 AAAA... comment``.
    """

    private_openssh: str = field(repr=False)
    public_line: str

    @property
    def paramiko_key(self) -> paramiko.PKey:
        """The private key as a paramiko key, for authenticating or serving."""
        return paramiko.Ed25519Key(file_obj=io.StringIO(self.private_openssh))

    @property
    def public_key(self) -> paramiko.PKey:
        """The public half as a paramiko key, for pinning."""
        return parse_public_key(self.public_line)

    @property
    def fingerprint(self) -> str:
        """The OpenSSH-style ``SHA256:...`` fingerprint of the public key."""
        return self.public_key.fingerprint


@dataclass(frozen=True)
class SandboxKeys:
    """The key files of one sandbox, as written by :func:`create_sandbox_keys`.

    Attributes:
        directory: the per-sandbox directory (mode 0700).
        client: the key pair the tunnel logs in with.
        host: the key pair the guest's sshd serves; the tunnel pins ``host.public_line``.
        client_key_path: the client private key file (mode 0600).
        host_key_path: the host private key file (mode 0600).
    """

    directory: Path
    client: KeyPair
    host: KeyPair
    client_key_path: Path
    host_key_path: Path


def generate_keypair(comment: str = "sandbox-kernels") -> KeyPair:
    """Generate a fresh Ed25519 key pair.

    Args:
        comment: the comment at the end of the public line; must not contain whitespace.

    Returns:
        The new key pair.

    Raises:
        SandboxConfigError: ``comment`` contains whitespace or control characters.
    """
    if not comment.isprintable() or any(c.isspace() for c in comment):
        raise SandboxConfigError(f"SSH key comment {comment!r} must be printable, no spaces.")
    private = ed25519.Ed25519PrivateKey.generate()
    private_text = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode("ascii")
    public = private.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return KeyPair(private_openssh=private_text, public_line=f"{public.decode('ascii')} {comment}")


def make_private_dir(path: str | os.PathLike[str]) -> Path:
    """Create a directory of mode 0700 (and its missing parents), or check an existing one.

    Args:
        path: the directory.

    Returns:
        The directory as a ``Path``.

    Raises:
        SandboxConfigError: the path exists but is not a directory, or is accessible by group
            or others, or is owned by another user.
    """
    directory = Path(path)
    directory.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        _check_private(directory, is_dir=True)
    return directory


def sandbox_key_dir(base: str | os.PathLike[str], sandbox_id: str) -> Path:
    """Create (or check) the private key directory ``<base>/<sandbox_id>``.

    Args:
        base: the directory holding all sandboxes' key directories.
        sandbox_id: the sandbox id; letters, digits, ``_``, ``.``, ``-`` only.

    Returns:
        The per-sandbox directory, mode 0700.

    Raises:
        SandboxConfigError: ``sandbox_id`` is not a plain name, or the directory is unsafe
            (see :func:`make_private_dir`).
    """
    if not _SANDBOX_ID.fullmatch(sandbox_id):
        raise SandboxConfigError(
            f"sandbox id {sandbox_id!r} cannot name a key directory: use letters, digits, "
            "'_', '.', '-', starting with a letter or digit."
        )
    make_private_dir(base)
    return make_private_dir(Path(base) / sandbox_id)


def write_private_file(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path``, created with mode 0600 and never readable by others.

    An existing file is truncated and reset to 0600 before any byte is written. Symbolic links
    are refused.

    Args:
        path: the file to write.
        data: its new content.

    Returns:
        The path.

    Raises:
        SandboxConfigError: the file cannot be written (the message names it).
    """
    return private_dirs.write_private_file(path, data, "key file")


def write_private_key(path: str | os.PathLike[str], keypair: KeyPair) -> Path:
    """Write the private key of ``keypair`` in OpenSSH format, mode 0600.

    Raises:
        SandboxConfigError: the file cannot be written.
    """
    return write_private_file(path, keypair.private_openssh.encode("ascii"))


def write_public_key(path: str | os.PathLike[str], keypair: KeyPair) -> Path:
    """Write the public line of ``keypair`` (with a newline), mode 0600.

    Raises:
        SandboxConfigError: the file cannot be written.
    """
    return write_private_file(path, f"{keypair.public_line}\n".encode("ascii"))


def create_sandbox_keys(base: str | os.PathLike[str], sandbox_id: str) -> SandboxKeys:
    """Generate a client and a host key pair for a sandbox and write them to its directory.

    Files: ``client_ed25519``, ``client_ed25519.pub``, ``host_ed25519``, ``host_ed25519.pub``.

    Raises:
        SandboxConfigError: bad ``sandbox_id`` or an unsafe or unwritable directory.
    """
    directory = sandbox_key_dir(base, sandbox_id)
    client = generate_keypair(f"sandbox-kernels-client@{sandbox_id}")
    host = generate_keypair(f"sandbox-kernels-host@{sandbox_id}")
    client_path = write_private_key(directory / CLIENT_KEY_NAME, client)
    write_public_key(directory / f"{CLIENT_KEY_NAME}.pub", client)
    host_path = write_private_key(directory / HOST_KEY_NAME, host)
    write_public_key(directory / f"{HOST_KEY_NAME}.pub", host)
    return SandboxKeys(directory, client, host, client_path, host_path)


def load_private_key(path: str | os.PathLike[str], password: str | None = None) -> paramiko.PKey:
    """Load an Ed25519, ECDSA or RSA private key file (OpenSSH or PEM format).

    Like OpenSSH, a key file that group or others may access is refused.

    Args:
        path: the private key file.
        password: the passphrase of an encrypted key.

    Returns:
        The paramiko key.

    Raises:
        SandboxConfigError: the file is missing, unreadable, accessible by group or others,
            encrypted without a password given, or not a supported key; the message names it.
    """
    key_path = Path(path).expanduser()
    _check_private(key_path, is_dir=False)
    try:
        return paramiko.PKey.from_path(key_path, password=password)
    except (OSError, ValueError, TypeError, paramiko.SSHException) as e:
        raise SandboxConfigError(
            f"cannot load SSH private key {key_path}: {e or type(e).__name__}. "
            "Give an Ed25519, ECDSA or RSA key in OpenSSH or PEM format "
            "(and its password if it is encrypted)."
        ) from e


def parse_public_key(line: str) -> paramiko.PKey:
    """Parse a public key line such as ``ssh-ed25519 AAAA... comment``.

    A ``known_hosts`` style line with leading host names is accepted too.

    Raises:
        SandboxConfigError: the line is not a supported public key.
    """
    fields = line.split()
    for i in range(len(fields) - 1):
        try:
            blob = paramiko.PublicBlob.from_string(f"{fields[i]} {fields[i + 1]}")
            return paramiko.PKey.from_type_string(blob.key_type, blob.key_blob)
        except (ValueError, TypeError, paramiko.SSHException, paramiko.UnknownKeyType):
            continue
    shown = line if len(line) < 80 else f"{line[:77]}..."
    raise SandboxConfigError(
        f"{shown!r} is not an SSH public key line; expected e.g. 'ssh-ed25519 AAAA...'."
    )


def known_host_keys(
    known_hosts: str | os.PathLike[str], alias: str, port: int = 22
) -> list[paramiko.PKey]:
    """Find the host keys of ``alias`` in a ``known_hosts`` file (hashed entries included).

    For a port other than 22 the ``[alias]:port`` entry is used, as OpenSSH does; a plain
    ``alias`` entry is the fallback.

    Raises:
        SandboxConfigError: the file cannot be read or has no key for the host.
    """
    path = Path(known_hosts).expanduser()
    host_keys = paramiko.HostKeys()
    try:
        host_keys.load(str(path))
    except (OSError, paramiko.SSHException) as e:
        raise SandboxConfigError(f"cannot read known_hosts file {path}: {e}") from e
    names = [f"[{alias}]:{port}", alias] if port != 22 else [alias]
    for name in names:
        entry = host_keys.lookup(name)
        if entry:
            return list(entry.values())
    raise SandboxConfigError(
        f"known_hosts file {path} has no host key for {' or '.join(names)}. Add one (for "
        f"example with `ssh-keyscan -p {port} {alias}` after checking its fingerprint)."
    )


def host_key_algorithms(keys: Iterable[paramiko.PKey]) -> list[str]:
    """The host key algorithms to offer so the server presents one of ``keys``."""
    algorithms: list[str] = []
    for key in keys:
        names = _RSA_HOST_KEY_ALGORITHMS if key.get_name() == "ssh-rsa" else (key.get_name(),)
        algorithms.extend(n for n in names if n not in algorithms)
    return algorithms


def describe_key(key: paramiko.PKey) -> str:
    """A short, secret-free description: ``SHA256:... (ssh-ed25519)``."""
    return f"{key.fingerprint} ({key.get_name()})"


def _check_private(path: Path, is_dir: bool) -> None:
    """Refuse a key file or directory that others could read or that is not ours.

    Raises:
        SandboxConfigError: missing, wrong type, wrong owner or too open; names the path.
    """
    try:
        st = path.stat()
    except OSError as e:
        raise SandboxConfigError(f"cannot read {path}: {e.strerror or e}") from e
    kind = "directory" if is_dir else "file"
    if (is_dir and not stat.S_ISDIR(st.st_mode)) or (not is_dir and not stat.S_ISREG(st.st_mode)):
        raise SandboxConfigError(f"{path} is not a {kind}.")
    if is_dir and st.st_uid != os.getuid():
        raise SandboxConfigError(
            f"key {kind} {path} belongs to uid {st.st_uid}, not to this user ({os.getuid()})."
        )
    if st.st_mode & 0o077:
        wanted = "700" if is_dir else "600"
        raise SandboxConfigError(
            f"key {kind} {path} is accessible by group or others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); run `chmod {wanted} {path}` and retry."
        )
