"""A writer for ``newc`` cpio archives, the format Linux unpacks as an initramfs."""

from __future__ import annotations

import gzip
import io


class Cpio:
    """Builds a ``newc`` (SVR4, no CRC) archive in memory; parents must be added first."""

    def __init__(self) -> None:
        self._buffer = io.BytesIO()
        self._ino = 1

    def directory(self, name: str, mode: int = 0o755) -> None:
        """Add a directory."""
        self._add(name, 0o040000 | mode, b"")

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        """Add a regular file."""
        self._add(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        """Add a symbolic link to ``target``."""
        self._add(name, 0o120777, target.encode())

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        """Add a character device node (e.g. ``/dev/console`` = 5:1)."""
        self._add(name, 0o020000 | mode, b"", (major, minor))

    def finish(self, compress: bool = False) -> bytes:
        """End the archive; gzip it if ``compress``."""
        self._add("TRAILER!!!", 0, b"")
        data = self._buffer.getvalue()
        return gzip.compress(data, compresslevel=6, mtime=0) if compress else data

    def _add(self, name: str, mode: int, data: bytes, rdev: tuple[int, int] = (0, 0)) -> None:
        path = name.lstrip("/").encode() + b"\0"
        fields = [self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(path), 0]
        self._ino += 1
        self._write(b"070701" + b"".join(b"%08X" % f for f in fields) + path)
        self._write(data)

    def _write(self, data: bytes) -> None:
        self._buffer.write(data)
        self._buffer.write(b"\0" * (-self._buffer.tell() % 4))
