"""``sandbox-kernels vm golden``: build (or list) the golden snapshots VM kernels start from."""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
import time
from typing import Any

from ...errors import SandboxConfigError

LIBVIRT_PROVISIONER = "sandbox-libvirt-provisioner"


def provisioner_for(kernel_name: str) -> Any:
    """The provisioner jupyter_client would make for the installed VM kernelspec ``kernel_name``
    (its ``kernel_provisioner`` config applied), with a kernel id of its own.

    Raises:
        SandboxConfigError: no such kernelspec, or it is not a libvirt (VM) kernel.
    """
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    from jupyter_client.provisioning import KernelProvisionerFactory

    try:
        spec = KernelSpecManager().get_kernel_spec(kernel_name)
    except NoSuchKernel as e:
        raise SandboxConfigError(
            f"no kernelspec {kernel_name!r}: install it with `sandbox-kernels install-kernelspecs`.") from e
    provisioner = spec.metadata.get("kernel_provisioner", {})
    if provisioner.get("provisioner_name") != LIBVIRT_PROVISIONER:
        raise SandboxConfigError(f"kernelspec {kernel_name!r} is not a VM kernel "
                                 f"(its provisioner is {provisioner.get('provisioner_name')!r}).")
    prov = KernelProvisionerFactory.instance().create_provisioner_instance(
        f"golden-{secrets.token_hex(6)}", spec, None)
    prov.log = logging.getLogger("sandbox_kernels.golden")
    return prov


async def build(kernel_name: str, rebuild: bool = False) -> Any:
    """Build the golden snapshot for ``kernel_name`` unless it exists (``rebuild``: anew)."""
    return await provisioner_for(kernel_name).build_golden(rebuild)


def _golden(args: argparse.Namespace) -> int:
    from . import golden

    if args.list:
        root = golden.golden_root()
        entries = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        for entry in entries:
            found = golden.load(entry.name)
            if found is None:
                print(f"{entry.name}  (incomplete)")
                continue
            size = found.root.stat().st_size >> 20
            made = time.strftime("%Y-%m-%d %H:%M", time.localtime(found.created))
            print(f"{found.key}  {made}  {size} MiB  {found.root}")
        if not entries:
            print(f"no golden snapshots in {root}")
        return 0
    if args.prune:
        for key in golden.prune():
            print(f"removed stale golden snapshot {key} (its base image or guest kernel changed)")
    for name in args.kernel or ["sandbox-nixos-vm"]:
        started = time.monotonic()
        found = asyncio.run(build(name, args.rebuild))
        print(f"{name}: golden snapshot {found.key} ({found.root}, {time.monotonic() - started:.1f} s)")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``vm golden`` to the ``sandbox-kernels`` command line."""
    vm = sub.add_parser("vm", help="VM kernel tools").add_subparsers(dest="vm_command", required=True)
    p = vm.add_parser("golden", help="build the golden memory snapshot VM kernels start from",
                      description="Boot a VM as the kernelspec configures it, import ipykernel in "
                                  "it, and keep its memory snapshot: kernels of that kernelspec "
                                  "then start by restoring it instead of booting. Cached by a key "
                                  "of everything the VM depends on.")
    p.add_argument("kernel", nargs="*", help="VM kernelspecs (default: sandbox-nixos-vm)")
    p.add_argument("--rebuild", action="store_true", help="build again even if one exists")
    p.add_argument("--prune", action="store_true",
                   help="first remove golden snapshots whose base image or guest kernel changed")
    p.add_argument("--list", action="store_true", help="list the golden snapshots and exit")
    p.set_defaults(func=_golden)
