"""The ``sandbox-kernels`` command line.

Sub-commands import what they need when they run, so ``sandbox-kernels --help`` works even
where an optional runtime's dependencies are missing.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Callable, Sequence

from .errors import SandboxError

Handler = Callable[[argparse.Namespace], int]


def _install_kernelspecs(args: argparse.Namespace) -> int:
    from . import kernelspecs

    prefix = kernelspecs.sys_prefix() if args.sys_prefix else args.prefix
    for path in kernelspecs.install(args.name or None, user=args.user, prefix=prefix):
        print(f"installed {path}")
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from . import doctor

    reports = doctor.check_all() if not args.runtime else [doctor.check(args.runtime)]
    if args.json:
        print(json.dumps([r.to_dict() for r in reports], indent=1))
    else:
        print(doctor.format_reports(reports))
    return 0 if all(r.ok for r in reports) or not args.strict else 1


def _image_build(args: argparse.Namespace) -> int:
    from .runtimes import registry

    build = registry.get(args.kind).load("image")
    print(build(force=args.force))
    return 0


def _image_check(args: argparse.Namespace) -> int:
    from .runtimes.vm.image_check import check_image

    report = check_image(args.path, kernel=args.kernel, initrd=args.initrd)
    print(report)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(
        prog="sandbox-kernels",
        description="Jupyter kernels in VMs, containers, pods and SSH hosts.",
    )
    from .runtimes import registry

    records = registry.records()  # only the records: no runtime's dependencies are imported
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("install-kernelspecs", help="install the sandbox kernelspecs")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="into the user's Jupyter data dir")
    where.add_argument("--sys-prefix", action="store_true", help="into the current environment")
    where.add_argument("--prefix", help="into PREFIX/share/jupyter/kernels")
    p.add_argument("name", nargs="*", help="kernelspecs to install (default: all)")
    p.set_defaults(func=_install_kernelspecs)

    p = sub.add_parser("doctor", help="check which runtimes can work here and how to fix them")
    p.add_argument("runtime", nargs="?", choices=[r.name for r in records])
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--strict", action="store_true", help="exit 1 if a runtime is not usable")
    p.set_defaults(func=_doctor)

    image = sub.add_parser("image", help="build or check sandbox images").add_subparsers(
        dest="image_command", required=True)
    p = image.add_parser("build", help="build the Docker image or the VM disk image")
    p.add_argument("kind", choices=[r.user_name for r in records if r.image])
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.set_defaults(func=_image_build)
    p = image.add_parser("check", help="boot a VM image and check the guest contract")
    p.add_argument("path", help="qcow2 image (e.g. a NixOS build result)")
    p.add_argument("--kernel", help="kernel for direct boot (default: next to the image)")
    p.add_argument("--initrd", help="initrd for direct boot (default: next to the image)")
    p.set_defaults(func=_image_check)

    for extend in _extensions():
        extend(sub)
    return parser


def _extensions() -> list[Callable[[argparse._SubParsersAction], None]]:  # type: ignore[type-arg]
    """Sub-commands defined by feature modules (snapshots, reaping, kernelspecs) and by the
    runtimes' records (the VM runtime's golden snapshots)."""
    import importlib

    from .runtimes import registry

    found = []
    for name in ("sandbox_kernels.snapshots.cli", "sandbox_kernels.reap", "sandbox_kernels.kernelspec_cli",
                 "sandbox_kernels.pool.cli"):
        found.append(importlib.import_module(name).add_parser)
    for record in registry.records():
        if record.commands:
            try:
                found.append(record.load("commands"))
            except SandboxError:
                continue  # its dependencies are missing: `doctor` says which extra brings them
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``sandbox-kernels``."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    handler: Handler = args.func
    try:
        return handler(args)
    except SandboxError as e:
        print(f"sandbox-kernels: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sandbox-kernels: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
