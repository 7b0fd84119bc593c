"""``python -m bench.profile_start [KERNEL]``: where one kernel start spends its wall time.

Starts one kernel (default ``sandbox-nixos-vm``) under pyinstrument in async mode, so time
spent awaiting (the guest booting, a thread doing a libvirt call) is charged to the coroutine
that waited, and prints:

* a timeline of the log lines emitted during the start, with seconds since ``start_kernel()``;
* what importing ipykernel costs inside the sandbox (``python -X importtime``), since under
  TCG the guest's Python start-up is where a VM start goes;
* pyinstrument's call trees of the start and of the graceful shutdown that follows (also
  written as HTML under ``bench/results/``).

pyinstrument only sees this process. To sample native frames and idle threads as well, run the
same start under py-spy: ``py-spy record --idle -o start.svg -- .venv/bin/python -m bench.profile_start``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import os
import time
from pathlib import Path
from typing import Any

from .kernels import Kernels, execute

RESULTS = Path(__file__).resolve().parent / "results"


class _Timeline(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.t0 = time.monotonic()
        self.lines: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((time.monotonic() - self.t0, f"{record.name}: {record.getMessage()}"[:160]))


_IMPORT_PROBE = """
import subprocess, sys, time
t = time.perf_counter()
p = subprocess.run([sys.executable, '-X', 'importtime', '-c', 'import ipykernel.kernelapp'],
                   capture_output=True, text=True)
print(f'{time.perf_counter() - t:.2f}')
rows = []
for line in p.stderr.splitlines():
    parts = line.split('|')
    if line.startswith('import time:') and len(parts) == 3 and parts[1].strip().isdigit():
        rows.append((int(parts[1]), int(parts[0].split(':')[1]), parts[2].rstrip()))
for cumulative, own, name in sorted(rows, reverse=True)[:12]:
    print(f'{cumulative / 1e6:8.2f} {own / 1e6:8.2f} {name}')
"""


async def _import_cost(kernel: Any) -> str:
    """Run ``python -X importtime -c 'import ipykernel.kernelapp'`` where the kernel runs."""
    out: list[str] = []

    def hook(msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])

    await execute(kernel.kc, _IMPORT_PROBE, timeout=600, hook=hook)
    return "".join(out)


async def profile(kernel_name: str) -> None:
    from pyinstrument import Profiler

    timeline = _Timeline()
    root = logging.getLogger()
    root.addHandler(timeline)
    root.setLevel(logging.INFO)
    for noisy in ("traitlets.paramiko", "paramiko", "asyncio"):
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
    stopper = Profiler(interval=0.001, async_mode="enabled")
    try:
        print(f"\n{kernel_name}: start-to-ready {kernel.start_seconds:.2f} s\n\nlog timeline (s since start_kernel):")
        for at, text in timeline.lines:
            print(f"  {at:7.2f}  {text}")
        lines = (await _import_cost(kernel)).splitlines()
        print(f"\ninside the sandbox: a fresh `python -X importtime -c 'import ipykernel.kernelapp'` "
              f"takes {lines[0]} s (files now in the page cache); largest imports:")
        print("  cumulative s   own s  module")
        for line in lines[1:]:
            print(f"  {line}")
        stopper.start()
        seconds = await kernels.stop(kernel)
        stopper.stop()
        print(f"\ngraceful shutdown: {seconds:.2f} s")
    finally:
        await kernels.stop_all()
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    for what, prof in (("start", profiler), ("shutdown", stopper)):
        html = RESULTS / f"profile-{kernel_name}-{what}-{stamp}.html"
        html.write_text(prof.output_html())
        print(f"\n== {what} ==")
        print(prof.output_text(unicode=True, color=False, show_all=False))
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
