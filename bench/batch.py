"""A papermill batch: N small notebooks at once, the way a user submits a batch of jobs.

Each notebook runs in its own ``papermill`` process, all launched together; for the VM kernel
``NIXOS_MAX_CONCURRENT_VMS=2`` makes the runtime's slot queue hold all but two. The wall time
is compared with the ideal ``N x (one run alone) / 2``. While the batch runs, a sampler reads
the peak resident memory (``VmHWM``) of each VM's QEMU process and the size of each qcow2
overlay. The papermill processes run in their own sessions; on Ctrl-C or any error each gets
SIGINT (papermill then shuts its kernel down), then SIGKILL, and any domain they still own is
destroyed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import probes

PAPERMILL = str(Path(sys.executable).parent / "papermill")


@dataclass
class BatchRun:
    """One batch (or one single run when ``n == 1``)."""

    kernel_name: str
    n: int
    wall: float = 0.0
    durations: list[float] = field(default_factory=list)
    peak_rss_mib: dict[str, float] = field(default_factory=dict)  # per domain
    peak_overlay_mib: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def write_notebook(path: Path) -> Path:
    """A small notebook: a parameter cell, a little computation, some output."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell("n = 20000")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [
        params,
        nbformat.v4.new_code_cell("import math, statistics\nxs = [math.sin(i) for i in range(n)]"),
        nbformat.v4.new_code_cell("print(f'mean={statistics.fmean(xs):.6f}')"),
    ]
    nbformat.write(nb, str(path))
    return path


async def run(kernel_name: str, n: int, notebook: Path, workdir: Path, env: dict[str, str],
              say: Any, sample_vms: bool = False) -> BatchRun:
    """Run ``n`` papermill processes of ``notebook`` on ``kernel_name`` at once.

    Raises:
        asyncio.CancelledError: on Ctrl-C, after every child and its sandbox are gone.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    result = BatchRun(kernel_name, n)
    procs: list[asyncio.subprocess.Process] = []
    sampler = _VMSampler(result, procs) if sample_vms else None
    sampler_task = asyncio.ensure_future(sampler.loop()) if sampler else None
    started = time.perf_counter()
    try:
        for i in range(n):
            log = open(workdir / f"run-{i}.log", "wb")
            try:
                procs.append(await asyncio.create_subprocess_exec(
                    PAPERMILL, "-k", kernel_name, "--start-timeout", "600", str(notebook),
                    str(workdir / f"out-{i}.ipynb"), stdin=asyncio.subprocess.DEVNULL,
                    stdout=log, stderr=asyncio.subprocess.STDOUT, env=env, start_new_session=True))
            finally:
                log.close()

        async def finish(i: int, proc: asyncio.subprocess.Process) -> None:
            code = await proc.wait()
            result.durations.append(time.perf_counter() - started)
            if code != 0:
                lines = (workdir / f"run-{i}.log").read_text(errors="replace").strip().splitlines()
                result.failures.append(f"run {i} exited {code}: {' / '.join(lines[-2:])[:300]} "
                                       f"(log {workdir / f'run-{i}.log'})")
            if n > 1:
                say(f"batch {kernel_name}: {len(result.durations)}/{n} done at "
                    f"{result.durations[-1]:.0f} s")

        await asyncio.gather(*(finish(i, p) for i, p in enumerate(procs)))
        result.wall = time.perf_counter() - started
    finally:
        if sampler_task is not None:
            sampler_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler_task
        await _stop_all(procs, say)
        if sampler is not None:
            await asyncio.to_thread(sampler.remove_leftovers, say)
    return result


async def _stop_all(procs: list[asyncio.subprocess.Process], say: Any) -> None:
    """SIGINT every child still running, wait up to 90 s, then SIGKILL."""
    running = [p for p in procs if p.returncode is None]
    if not running:
        return
    say(f"batch: stopping {len(running)} papermill processes (SIGINT; their kernels shut down)")
    for p in running:
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGINT)
    try:
        await asyncio.wait_for(asyncio.gather(*(p.wait() for p in running)), 90)
    except asyncio.TimeoutError:
        for p in running:
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
        await asyncio.gather(*(p.wait() for p in running))


class _VMSampler:
    """Finds the domains the batch's papermill processes own and samples their cost."""

    def __init__(self, result: BatchRun, procs: list[asyncio.subprocess.Process]) -> None:
        self.result = result
        self.procs = procs
        self.domains: dict[str, tuple[int | None, Path]] = {}  # name -> (qemu pid, overlay)
        self.foreign: set[str] = set()

    async def loop(self) -> None:
        from sandbox_kernels.runtimes.vm.libvirt_conn import LibvirtHost

        host = LibvirtHost()
        try:
            while True:
                await asyncio.to_thread(self._sample, host)
                await asyncio.sleep(1.0)
        finally:
            await asyncio.to_thread(host.close)

    def _owned(self, host: Any, name: str) -> bool:
        from sandbox_kernels import labels

        owner = host.labels(name).get(labels.OWNER_PID, "")
        return owner in {str(p.pid) for p in self.procs}

    def _sample(self, host: Any) -> None:
        from sandbox_kernels.cache import cache_dir

        with contextlib.suppress(Exception):
            for name in host.list_domains():
                if name in self.domains or name in self.foreign:
                    continue
                if self._owned(host, name):
                    kernel_id = name.removeprefix("sandbox-kernels-")
                    images = Path(os.environ.get("NIXOS_EPHEMERAL_VM_IMAGES_DIR") or cache_dir() / "ephemeral")
                    self.domains[name] = (None, images / kernel_id)
                else:
                    self.foreign.add(name)
        for name, (pid, overlay) in list(self.domains.items()):
            if pid is None:
                with contextlib.suppress(Exception):
                    pid = host.qemu_pid(name)
                    self.domains[name] = (pid, overlay)
            if pid is not None:
                _, hwm = probes.proc_memory(pid)
                if hwm:
                    self.result.peak_rss_mib[name] = max(self.result.peak_rss_mib.get(name, 0), hwm / probes.MiB)
            if overlay.exists():
                size = probes.allocated_bytes(overlay) / probes.MiB
                self.result.peak_overlay_mib[name] = max(self.result.peak_overlay_mib.get(name, 0), size)

    def remove_leftovers(self, say: Any) -> None:
        """Destroy domains still owned by the batch's (now ended) papermill processes."""
        from sandbox_kernels.runtimes.vm import overlay
        from sandbox_kernels.runtimes.vm.libvirt_conn import LibvirtHost

        with LibvirtHost() as host:
            for name in host.list_domains():
                try:
                    if name in self.foreign or not self._owned(host, name):
                        continue
                    say(f"batch: removing leftover domain {name}")
                    host.destroy(name)
                except Exception as e:  # gone meanwhile, or libvirt refused: say so, go on
                    say(f"batch: could not check or remove {name}: {e}")
                    continue
                if name in self.domains:
                    overlay.remove_images(self.domains[name][1])
