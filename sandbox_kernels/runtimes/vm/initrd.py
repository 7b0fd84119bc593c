"""A minimal initrd for the Debian guest: busybox, a few virtio modules and ``guest/initrd-init``.

initramfs-tools' initrd starts udev, which costs seconds under TCG emulation; this one only
loads the modules the root disk needs (with their dependencies, from ``modules.dep``) and
switches to the root filesystem.
"""

from __future__ import annotations

from pathlib import Path

from ...errors import SandboxError
from .cpio import Cpio

INITRD_INIT = Path(__file__).resolve().parents[2] / "guest" / "initrd-init"


def kernel_release(root: Path) -> str:
    """The single kernel release installed in ``root`` (``/usr/lib/modules/<release>``).

    Raises:
        SandboxError: none or several are installed.
    """
    releases = [p.name for p in (root / "usr/lib/modules").iterdir() if p.is_dir()]
    if len(releases) != 1:
        raise SandboxError(f"expected one kernel in {root}/usr/lib/modules, found {releases}")
    return releases[0]


def module_load_order(root: Path, release: str, wanted: list[str]) -> list[Path]:
    """Module files to load for ``wanted``, dependencies first; built-in modules are skipped.

    Raises:
        SandboxError: a wanted module is neither built in nor a module file.
    """
    moddir = root / "usr/lib/modules" / release
    deps: dict[str, tuple[str, list[str]]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[_name(path)] = (path, [_name(d) for d in rest.split()])
    builtin = {_name(line) for line in (moddir / "modules.builtin").read_text().split()}
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in builtin or name in seen:
            return
        if name not in deps:
            raise SandboxError(f"module {name} is neither built into {release} nor installed.")
        seen.add(name)
        path, needs = deps[name]
        for need in needs:
            visit(need)
        order.append(moddir / path)

    for name in wanted:
        visit(name.replace("-", "_"))
    return order


def build_initrd(root: Path, modules: list[str]) -> bytes:
    """The gzip-compressed initrd for the kernel installed in ``root``.

    Raises:
        SandboxError: no ``/bin/busybox`` (busybox-static) in ``root``, or a missing module.
    """
    busybox = root / "usr/bin/busybox"
    if not busybox.is_file():
        raise SandboxError(f"{busybox} is missing: install busybox-static in the guest root.")
    release = kernel_release(root)
    order = module_load_order(root, release, modules)
    if any(path.suffix != ".ko" for path in order):
        raise SandboxError(f"compressed modules are not supported by the initrd: {order}")
    archive = Cpio()
    for directory in ("bin", "dev", "lib", "lib/modules", "proc", "root", "sys"):
        archive.directory(directory)
    archive.char_device("dev/console", 5, 1)
    archive.file("bin/busybox", busybox.read_bytes(), 0o755)
    archive.file("init", INITRD_INIT.read_bytes(), 0o755)
    for path in order:
        archive.file(f"lib/modules/{path.stem}.ko", path.read_bytes())
    archive.file("lib/modules/load-order", "".join(f"{p.stem}\n" for p in order).encode())
    return archive.finish(compress=True)


def _name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    return base.split(".ko", 1)[0].replace("-", "_")
