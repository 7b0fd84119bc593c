"""``python -m bench.profile_start [KERNEL]``: where one kernel start spends its wall time.

Starts one kernel (default ``sandbox-nixos-vm``) under pyinstrument in async mode, so time
spent awaiting (the guest booting, a thread doing a libvirt call) is charged to the coroutine
that waited, and prints:

* a timeline of the log lines emitted during the start, with seconds since ``start_kernel()``;
* for a VM, the guest's own timestamps from its serial console (kernel boot to sshd);
* pyinstrument's call tree (also written as HTML under ``bench/results/``).

pyinstrument only sees this process. To sample native frames and idle threads as well, run the
same start under py-spy: ``py-spy record --idle -o start.svg -- .venv/bin/python -m bench.profile_start``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import os
import re
import time
from pathlib import Path

from .kernels import Kernels

RESULTS = Path(__file__).resolve().parent / "results"


class _Timeline(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.t0 = time.monotonic()
        self.lines: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((time.monotonic() - self.t0, f"{record.name}: {record.getMessage()}"[:160]))


def _guest_timeline(console: Path) -> list[str]:
    """Lines of the guest console with a kernel timestamp that mark boot progress."""
    wanted = re.compile(r"Run /init|sandbox|SANDBOX|sshd|EXT4-fs|Freeing unused kernel|virtio", re.I)
    out = []
    for line in console.read_text(errors="replace").splitlines():
        if line.startswith("[") and wanted.search(line):
            out.append(line.strip()[:140])
    return out[:40]


async def profile(kernel_name: str) -> None:
    from pyinstrument import Profiler

    logging.basicConfig(level=logging.WARNING)
    timeline = _Timeline()
    root = logging.getLogger()
    root.addHandler(timeline)
    root.setLevel(logging.DEBUG)
    for noisy in ("paramiko", "asyncio", "traitlets.config"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    kernels = Kernels()
    profiler = Profiler(interval=0.001, async_mode="enabled")
    timeline.t0 = time.monotonic()
    profiler.start()
    try:
        kernel = await kernels.start(kernel_name)
    finally:
        profiler.stop()
        root.removeHandler(timeline)
    try:
        print(f"\n{kernel_name}: start-to-ready {kernel.start_seconds:.2f} s\n\nlog timeline (s since start_kernel):")
        for at, text in timeline.lines:
            print(f"  {at:7.2f}  {text}")
        state_dir = getattr(kernel.km.provisioner, "_state_dir", None)
        console = Path(state_dir) / "console.log" if state_dir else None
        if console and console.exists():
            print("\nguest console (guest kernel timestamps, s since the guest kernel started):")
            for line in _guest_timeline(console):
                print(f"  {line}")
    finally:
        await kernels.stop_all()
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    html = RESULTS / f"profile-{kernel_name}-{stamp}.html"
    html.write_text(profiler.output_html())
    print(profiler.output_text(unicode=True, color=False, show_all=False))
    print(f"pyinstrument HTML: {html}")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_start", description=__doc__.split("\n")[0])
    parser.add_argument("kernel", nargs="?", default="sandbox-nixos-vm")
    args = parser.parse_args()
    os.environ.setdefault("SANDBOX_KERNELS_STATE_DIR", "/tmp/sandbox-kernels-bench/state")
    try:
        asyncio.run(profile(args.kernel))
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
