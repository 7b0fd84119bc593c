"""The per-runtime figures: starts, round-trips, output throughput, footprint, snapshots.

``measure_runtime`` runs one runtime's whole sequence. Cold starts come first; the last kernel
started is kept and reused for everything else (so a VM is booted ``starts`` times, not once
per figure), then shut down. Each timing of a sandbox runtime is paired with a local-kernel
timing taken right after it (a local start after each start, local round-trips in alternating
blocks, a local output run after each output run), and the ratio is taken against those, so
load from other work on the machine affects both sides alike. A failure inside one figure is
recorded in that figure's row and the sequence goes on; every kernel is shut down on every path.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from . import probes
from .kernels import (LOCAL_KERNEL, BenchError, Kernel, Kernels, display_throughput, execute, roundtrips,
                      stdout_throughput)
from .results_model import Goal, Results

START = "start-to-ready (cold)"
GOLDEN = "start-to-ready (golden snapshot)"
WARM = "restart in sandbox"
SHUTDOWN = "shutdown"
ROUNDTRIP = "execute round-trip"
STDOUT = "stdout throughput"
DISPLAY = "display-data throughput"
MEMORY = "host memory, idle kernel"
DISK = "disk per sandbox"
SNAP_CREATE = "snapshot create"
SNAP_ROLLBACK = "snapshot rollback"
DISK_SNAP_CREATE = "disk snapshot create"
DISK_SNAP_ROLLBACK = "disk snapshot rollback"
POOLED = "start-to-ready (warm pool)"
REFILL = "warm pool: refill one sandbox"
POOL_MEMORY = "warm pool: memory per idle sandbox"

GOALS: dict[tuple[str, str], Goal] = {
    (START, "docker"): Goal("<=", 1.3),
    (START, "vm"): Goal("<=", 15),
    (GOLDEN, "vm"): Goal("<=", 4),
    (POOLED, "vm"): Goal("<=", 1.2),
    (POOLED, "docker"): Goal("<=", 1.0),
    (ROUNDTRIP, "ssh"): Goal("<=", 1.2),
    (ROUNDTRIP, "vm"): Goal("<=", 1.2),
    (STDOUT, "docker"): Goal(">=", 0.5),
    (STDOUT, "ssh"): Goal(">=", 0.5),
    (STDOUT, "vm"): Goal(">=", 0.5),
    (STDOUT, "k8s"): Goal(">=", 0.5),
    (SNAP_CREATE, "vm"): Goal("<=", 1.0, relative=False),
    (SNAP_ROLLBACK, "vm"): Goal("<=", 3.0, relative=False),
}

UNITS = {START: "s", GOLDEN: "s", WARM: "s", SHUTDOWN: "s", ROUNDTRIP: "ms", STDOUT: "MiB/s", DISPLAY: "MiB/s",
         MEMORY: "MiB", DISK: "MiB", SNAP_CREATE: "s", SNAP_ROLLBACK: "s",
         DISK_SNAP_CREATE: "s", DISK_SNAP_ROLLBACK: "s", POOLED: "s", REFILL: "s", POOL_MEMORY: "MiB"}
BASELINES = {GOLDEN: START, WARM: START, SNAP_CREATE: None, SNAP_ROLLBACK: None, DISK: None,
             DISK_SNAP_CREATE: None, DISK_SNAP_ROLLBACK: None, POOLED: START, REFILL: None,
             POOL_MEMORY: None}


@dataclass
class Plan:
    """How many samples of each figure to take for one runtime."""

    starts: int
    golden: int  # starts from a golden snapshot (the VM only; 0: none)
    warm: int
    roundtrips: int
    reps: int  # output-throughput repetitions
    stdout_bytes: int
    display_bytes: int
    snapshots: int  # create/rollback pairs (0: the runtime has none)
    pooled: int = 0  # starts from a warm pool of one (runtimes with pools)


def row(results: Results, figure: str, runtime: str, note: str = "") -> Any:
    """The (figure, runtime) row with its unit, baseline and goal filled in."""
    kwargs: dict[str, Any] = {"goal": GOALS.get((figure, runtime))}
    if figure in BASELINES:
        kwargs["baseline"] = BASELINES[figure]
    r = results.row(figure, runtime, UNITS[figure], **kwargs)
    if note and note not in r.note:
        r.note = "; ".join(filter(None, [r.note, note]))
    return r


class Progress:
    """Timestamped progress lines on stderr."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.started = time.monotonic()

    def __call__(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:7.1f}s] {text}", file=self.stream, flush=True)


async def _figure(results: Results, figs: tuple[str, ...], runtime: str, say: Progress,
                  work: Callable[[], Awaitable[None]]) -> None:
    """Run one figure's work; record a failure in its rows instead of ending the run."""
    try:
        await work()
    except Exception as e:  # a runtime error is a result too; Ctrl-C is not caught here
        text = str(e) if isinstance(e, BenchError) else f"{type(e).__name__}: {e}"
        say(f"{runtime}: {figs[0]} failed: {text}")
        for figure in figs:
            results.skip(figure, runtime, UNITS[figure], f"failed: {text}")


@dataclass
class Run:
    """What one runtime's measurements share."""

    runtime: str
    kernel_name: str
    plan: Plan
    kernels: Kernels
    results: Results
    say: Progress
    footprint: Callable[[Kernel], probes.Footprint] | None
    #: A local kernel kept running for the paired samples (None when measuring local itself).
    companion: Kernel | None = None

    def row(self, figure: str, note: str = "") -> Any:
        return row(self.results, figure, self.runtime, note)

    async def paired_local_start(self, figure: str) -> None:
        """A local cold start right after this runtime's sample, for the paired ratio."""
        if self.companion is None:
            return
        k = await self.kernels.start(LOCAL_KERNEL)
        await self.kernels.stop(k)
        self.row(figure).paired.append(k.start_seconds)


@contextlib.contextmanager
def _golden_off(runtime: str) -> Iterator[None]:
    """VM cold starts boot: no golden snapshot (NIXOS_VM_GOLDEN_SNAPSHOT=0) while they run."""
    if runtime != "vm":
        yield
        return
    old = os.environ.get("NIXOS_VM_GOLDEN_SNAPSHOT")
    os.environ["NIXOS_VM_GOLDEN_SNAPSHOT"] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("NIXOS_VM_GOLDEN_SNAPSHOT", None)
        else:
            os.environ["NIXOS_VM_GOLDEN_SNAPSHOT"] = old


async def measure_runtime(run: Run) -> None:
    """Take every per-runtime figure for ``run.runtime``."""
    for figure in (START, WARM, ROUNDTRIP, STDOUT, DISPLAY):
        run.row(figure)
    kept: Kernel | None = None
    try:
        with _golden_off(run.runtime):
            kept = await _starts(run, START, run.plan.starts, kept)
        if run.plan.golden:
            kept = await _starts(run, GOLDEN, run.plan.golden, kept)
        if kept is not None:
            await _run_figures(run, kept)
    except BenchError as e:
        run.say(f"{run.runtime}: {e}")
        run.results.skip(START, run.runtime, "s", str(e))
    except BaseException:  # Ctrl-C, SIGTERM: shut down, but do not count it as a sample
        if kept is not None:
            await run.kernels.stop(kept)
            kept = None
        raise
    finally:
        if kept is not None:
            seconds = await run.kernels.stop(kept)
            run.row(SHUTDOWN).samples.append(seconds)
            run.say(f"{run.runtime}: shut down in {seconds:.2f} s")


async def _starts(run: Run, figure: str, count: int, kept: Kernel | None) -> Kernel | None:
    """``count`` starts for ``figure``, each paired with a local one; returns the last kernel.

    The kernel passed in (the previous figure's last) is stopped first; on a failure the
    kernel started so far is returned for the caller to stop.
    """
    failed: list[str] = []
    what = "cold start" if figure == START else "golden start"
    run.row(figure)
    for i in range(count):
        if kept is not None:
            seconds = await run.kernels.stop(kept)
            kept = None
            run.row(SHUTDOWN).samples.append(seconds)
        try:
            kept = await run.kernels.start(run.kernel_name)
        except BenchError as e:  # e.g. the sandbox was removed from outside: note it, go on
            run.say(f"{run.runtime}: {what} {i + 1}/{count} failed: {e}")
            failed.append(str(e))
            if len(failed) >= 2 and not run.row(figure).samples:
                break
            continue
        mode = getattr(kept.km.provisioner, "start_mode", "")
        if figure == GOLDEN and mode != "golden":
            failed.append(f"the VM started by {mode or 'booting'}: build the golden snapshot "
                          "with `sandbox-kernels vm golden`")
            continue
        run.row(figure).samples.append(kept.start_seconds)
        run.say(f"{run.runtime}: {what} {i + 1}/{count}: {kept.start_seconds:.2f} s")
        await run.paired_local_start(figure)
    if failed:
        run.results.skip(figure, run.runtime, "s", f"{len(failed)} of {count} starts failed, "
                         f"first: {failed[0][:300]}")
    return kept


async def _run_figures(run: Run, k: Kernel) -> None:
    name, plan, say, local = run.runtime, run.plan, run.say, run.companion

    async def roundtrip() -> None:
        block = 10  # alternate blocks with the local kernel: both see the same host load
        for done in range(0, plan.roundtrips, block):
            n = min(block, plan.roundtrips - done)
            run.row(ROUNDTRIP).samples.extend(await roundtrips(k.kc, n, warmup=5 if done == 0 else 0))
            if local is not None:
                run.row(ROUNDTRIP).paired.extend(await roundtrips(local.kc, n, warmup=0))
        say(f"{name}: {plan.roundtrips} round-trips, median {run.row(ROUNDTRIP).median:.1f} ms")

    async def memory() -> None:
        if run.footprint is None:
            raise BenchError("no host-side probe for this runtime")
        fp = await asyncio.to_thread(run.footprint, k)
        how, _, disk_how = fp.how.partition("; ")
        run.row(MEMORY, how).samples.append(fp.rss_mib)
        if fp.disk_mib is not None:
            run.row(DISK, disk_how).samples.append(fp.disk_mib)
        say(f"{name}: host memory {fp.rss_mib:.0f} MiB"
            + (f", disk {fp.disk_mib:.1f} MiB" if fp.disk_mib is not None else ""))

    async def output(figure: str, measure: Callable[[Any, int], Awaitable[Any]], size: int,
                     what: str) -> None:
        for _ in range(plan.reps):
            rate, stray = _rate(await measure(k.kc, size))
            run.row(figure, what).samples.append(rate)
            if stray:
                run.row(figure, f"the cell also printed {stray!r}")
            if local is not None:
                run.row(figure).paired.append(_rate(await measure(local.kc, size))[0])
            say(f"{name}: {figure} {size // 2**20} MiB at {rate:.1f} MiB/s")

    async def warm() -> None:
        for i in range(plan.warm):
            seconds = await run.kernels.restart(k)
            run.row(WARM).samples.append(seconds)
            say(f"{name}: restart {i + 1}/{plan.warm}: {seconds:.2f} s")
            await run.paired_local_start(WARM)

    await _figure(run.results, (ROUNDTRIP,), name, say, roundtrip)
    await _figure(run.results, (MEMORY,), name, say, memory)
    await _figure(run.results, (STDOUT,), name, say, lambda: output(
        STDOUT, stdout_throughput, plan.stdout_bytes, f"{plan.stdout_bytes // 2**20} MiB in 64 KiB writes"))
    await _figure(run.results, (DISPLAY,), name, say, lambda: output(
        DISPLAY, display_throughput, plan.display_bytes, f"one {plan.display_bytes // 2**20} MiB text/html result"))
    if plan.snapshots:
        await _figure(run.results, (SNAP_CREATE, SNAP_ROLLBACK), name, say, lambda: _snapshots(run, k))
        if "disk" in k.km.provisioner.snapshot_capabilities().kinds:  # VM: the cheaper kind too
            await _figure(run.results, (DISK_SNAP_CREATE, DISK_SNAP_ROLLBACK), name, say,
                          lambda: _snapshots(run, k, "disk", min(2, plan.snapshots)))
    await _figure(run.results, (WARM,), name, say, warm)


def _rate(result: float | tuple[float, str]) -> tuple[float, str]:
    return result if isinstance(result, tuple) else (result, "")


async def _snapshots(run: Run, k: Kernel, kind: str | None = None, reps: int | None = None) -> None:
    """Create a snapshot, change state, roll back, check the state came back, delete it."""
    from sandbox_kernels.errors import SandboxConfigError
    from sandbox_kernels.snapshots.service import SnapshotService

    service = SnapshotService(k.km.provisioner)
    memory_mb = getattr(k.km.provisioner, "memory_mb", None)
    note = f"guest memory {memory_mb} MiB" if memory_mb else "container filesystem (docker commit)"
    create_fig, rollback_fig = (DISK_SNAP_CREATE, DISK_SNAP_ROLLBACK) if kind == "disk" else (SNAP_CREATE, SNAP_ROLLBACK)
    for i in range(run.plan.snapshots if reps is None else reps):
        name = f"bench-{kind or 'default'}-{i}"
        await execute(k.kc, f"open('bench-marker', 'w').write('{i}')")
        started = time.perf_counter()
        await service.create(name, kind)
        created = time.perf_counter() - started
        run.row(create_fig, note).samples.append(created)
        await execute(k.kc, "open('bench-marker', 'w').write('changed')")
        started = time.perf_counter()
        result = await service.rollback(name)
        await k.kc.wait_for_ready(timeout=run.kernels.start_timeout)
        rolled = time.perf_counter() - started
        run.row(rollback_fig, "until the kernel answers kernel_info again"
                + ("; the runtime restarts the kernel" if result.kernel_restarted else "")
                ).samples.append(rolled)
        seen = await _read_marker(k)
        if seen != str(i):
            raise BenchError(f"after rollback the marker file holds {seen!r}, not {i!r}")
        run.say(f"{run.runtime}: snapshot {i + 1}/{run.plan.snapshots}: create {created:.2f} s, "
                f"rollback {rolled:.2f} s")
        try:
            await service.delete(name)
        except SandboxConfigError:
            pass  # Docker: the container now runs from it; it goes with the kernel


async def _read_marker(k: Kernel) -> str:
    out: list[str] = []

    def hook(msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])

    await execute(k.kc, "print(open('bench-marker').read())", timeout=300, hook=hook)
    return "".join(out).strip()

