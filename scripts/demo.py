"""Run notebooks/demo.ipynb with papermill on each sandbox kernel that works here; summarise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat

REPO = Path(__file__).resolve().parent.parent
KERNELS = ["sandbox-docker", "sandbox-gvisor", "sandbox-nixos-vm"]


def installed_kernels() -> set[str]:
    from jupyter_client.kernelspec import KernelSpecManager

    return set(KernelSpecManager().find_kernel_specs())


def vm_guest_os() -> str:
    """Which OS "Python (NixOS VM)" booted: the NixOS image, or the Debian CI guest."""
    from sandbox_kernels.images.guest_os import guest_os
    from sandbox_kernels.runtimes.vm.provisioner import LibvirtProvisioner

    return guest_os(LibvirtProvisioner(kernel_id="demo", kernel_spec=None).base_image).describe()


def summary(path: Path) -> list[str]:
    nb = nbformat.read(path, as_version=4)
    lines = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            lines += [line for line in out.get("text", "").splitlines() if line.strip()]
    return lines


def main() -> int:
    out_dir = REPO / "notebooks" / "out"
    out_dir.mkdir(exist_ok=True)
    available = installed_kernels()
    failures = 0
    for kernel in KERNELS:
        if kernel not in available:
            print(f"\n== {kernel}: not installed in this version, skipped")
            continue
        out = out_dir / f"demo-{kernel}.ipynb"
        print(f"\n== papermill -k {kernel} notebooks/demo.ipynb {out.relative_to(REPO)}", flush=True)
        proc = subprocess.run([str(Path(sys.executable).parent / "papermill"), "-k", kernel,
                               str(REPO / "notebooks" / "demo.ipynb"), str(out)])
        if proc.returncode != 0:
            failures += 1
            continue
        print(f"executed notebook: {out}")
        if kernel == "sandbox-nixos-vm":
            print(f"   guest OS: {vm_guest_os()}")
        for line in summary(out):
            print(f"   {line}")
    print("\nTry it in JupyterLab: .venv/bin/jupyter lab --allow-root, open a notebook with the "
          "'Python (NixOS VM)' kernel, and use the 'Sandbox snapshots' panel in the right sidebar "
          "(URL path /lab; REST API under /sandbox-kernels/api/).")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
