"""``python -m bench``: measure every runtime beside a local kernel and print one table.

See ``bench/README.md`` for what each figure means and the goals it is judged against.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from . import batch, figures, pool, probes, sshhost
from .figures import Plan, Progress
from .kernels import LOCAL_KERNEL, Kernel, Kernels
from .report import table, write_json, write_plot
from .results_model import Results

#: Slow runtimes last, so a quick look at the table sees the fast ones first.
ORDER = ("docker", "gvisor", "ssh", "vm", "k8s")
RESULTS_DIR = Path(__file__).resolve().parent / "results"
WORK_DIR = Path("/tmp/sandbox-kernels-bench")
MiB = 2**20

BATCH_ONE = "papermill, one notebook alone"
BATCH_WALL = "papermill batch wall time"
BATCH_IDEAL = "batch wall / ideal"
BATCH_RSS = "batch: peak host RSS per VM"
BATCH_DISK = "batch: peak overlay disk per VM"
BATCH_POOL_WALL = "papermill batch wall time, warm pool on"
BATCH_POOL_IDEAL = "batch wall / ideal, warm pool on"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the sandbox runtimes against a local ipykernel (see bench/README.md).")
    parser.add_argument("--quick", action="store_true",
                        help="few samples and smaller outputs (CI smoke run, ~5 min with a VM)")
    known = runtime_kernels()
    parser.add_argument("--runtimes", default=",".join(known),
                        help=f"comma-separated subset of {','.join(known)} (the local kernel always runs)")
    parser.add_argument("--iterations", type=int, default=None, metavar="N",
                        help="execute round-trips per runtime (default 200, --quick 20; the VM gets N/4)")
    parser.add_argument("--starts", type=int, default=None, metavar="N",
                        help="cold starts per runtime (default 10, VM and k8s 5; --quick 3, VM 1)")
    parser.add_argument("--batch", type=int, default=None, metavar="N",
                        help="notebooks in the papermill batch (default 20, --quick 4; 0 skips it)")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="where JSON and PNG go")
    args = parser.parse_args(argv)
    wanted = [r.strip() for r in args.runtimes.split(",") if r.strip() and r.strip() != "local"]
    unknown = sorted(set(wanted) - set(known))
    if unknown:
        parser.error(f"unknown runtime(s) {', '.join(unknown)}; use {', '.join(known)}")
    args.runtimes = ["local"] + [r for r in known if r in wanted]
    return args


def runtime_kernels() -> dict[str, str]:
    """What users call each runtime (``vm`` for libvirt) -> its kernelspec, from the records."""
    from sandbox_kernels.runtimes import registry

    found = {r.user_name: r.kernel_name for r in registry.records()}
    return {name: found[name] for name in sorted(found, key=lambda n: (ORDER + (n,)).index(n))}


def kernel_name(runtime: str) -> str:
    """The kernelspec ``runtime`` is measured with (``local``: the plain ipykernel)."""
    return LOCAL_KERNEL if runtime == "local" else runtime_kernels()[runtime]


def doctor_name(runtime: str) -> str:
    """The record name ``doctor`` knows ``runtime`` by (``libvirt`` for ``vm``)."""
    from sandbox_kernels.runtimes import registry

    return registry.get(runtime).name


def make_plan(runtime: str, args: argparse.Namespace) -> Plan:
    """Sample counts: slow runtimes (the VM under TCG, Kubernetes) get fewer."""
    slow = runtime in ("vm", "k8s")
    if args.quick:
        plan = Plan(starts=1 if slow else 3, golden=2, warm=1 if slow else 2, roundtrips=20, reps=1,
                    stdout_bytes=10 * MiB, display_bytes=4 * MiB, snapshots=1)
    else:
        plan = Plan(starts=5 if slow else 10, golden=5, warm=3 if slow else 5, roundtrips=200,
                    reps=1 if slow else 3, stdout_bytes=100 * MiB, display_bytes=20 * MiB,
                    snapshots=3 if slow else 5)
    if args.iterations is not None:
        plan.roundtrips = args.iterations
    if slow:
        plan.roundtrips = max(5, plan.roundtrips // 4)
    if args.starts is not None:
        plan.starts = max(1, args.starts)
    if runtime not in ("vm", "docker", "gvisor"):
        plan.snapshots = 0
    if runtime != "vm":
        plan.golden = 0
    plan.pooled = (2 if args.quick else 5) if runtime in pool.POOL_ENV else 0
    return plan


def unavailable(runtime: str) -> str | None:
    """Why ``runtime`` cannot be measured here, or None if it can."""
    from jupyter_client.kernelspec import KernelSpecManager

    from sandbox_kernels import doctor

    if kernel_name(runtime) not in KernelSpecManager().find_kernel_specs():
        return f"kernelspec {kernel_name(runtime)} is not installed"
    if runtime == "local":
        return None
    if runtime == "ssh":
        try:
            sshhost.check()
        except sshhost.Unavailable as e:
            return str(e)
        return None
    report = doctor.check(doctor_name(runtime))
    if not report.ok:
        return "; ".join(report.details[-2:])
    return None


FOOTPRINTS: dict[str, Callable[[Kernel], probes.Footprint]] = {
    "local": lambda k: probes.local_footprint(k.km),
    "docker": lambda k: probes.docker_footprint(k.km.provisioner),
    "gvisor": lambda k: probes.docker_footprint(k.km.provisioner),  # a Docker container under runsc
    "vm": lambda k: probes.vm_footprint(k.km.provisioner),
    "ssh": lambda k: probes.ssh_footprint(sshhost.USER),
}


def other_sandboxes() -> str:
    """Sandboxes running now that this run did not start (contention to note)."""
    parts = []
    try:
        from sandbox_kernels.runtimes.vm.libvirt_conn import LibvirtHost

        with LibvirtHost() as host:
            parts.append(f"{sum(1 for d in host.list_domains() if host.state(d) == 'running')} VMs")
    except Exception:
        parts.append("VMs unknown")
    try:
        import docker

        client = docker.from_env(timeout=10)
        parts.append(f"{len(client.api.containers(filters={'label': 'sandbox-kernels.kernel-id'}))} containers")
        client.close()
    except Exception:
        parts.append("containers unknown")
    return ", ".join(parts)


async def run(args: argparse.Namespace, say: Progress, results: Results, meta: dict[str, Any]) -> None:
    """Every selected runtime, then the papermill batch; kernels are stopped on every path."""
    kernels = Kernels()
    companion = None
    try:
        for runtime in args.runtimes:
            reason = await asyncio.to_thread(unavailable, runtime)
            if reason:
                say(f"{runtime}: skipped: {reason}")
                results.skip(figures.START, runtime, "s", reason)
                continue
            if runtime != "local" and companion is None:
                companion = await kernels.start(LOCAL_KERNEL)
            plan = make_plan(runtime, args)
            say(f"{runtime}: {plan.starts} cold starts, {plan.golden} from a golden snapshot, "
                f"{plan.warm} restarts, {plan.roundtrips} round-trips, "
                f"{plan.reps}x output, {plan.snapshots} snapshots")
            run_ = figures.Run(runtime, kernel_name(runtime), plan, kernels, results, say,
                               FOOTPRINTS.get(runtime), companion)
            try:
                if runtime == "ssh":
                    with sshhost.ssh_host(WORK_DIR / "sshd"):
                        await figures.measure_runtime(run_)
                else:
                    await figures.measure_runtime(run_)
                    await pool.measure(run_, plan.pooled)
            except Exception as e:  # set-up failed (sshd, engine): record it, go on with the next
                say(f"{runtime}: failed: {type(e).__name__}: {e}")
                results.skip(figures.START, runtime, "s", f"failed: {type(e).__name__}: {e}")
        if companion is not None:
            await kernels.stop(companion)
            companion = None
        n = args.batch if args.batch is not None else (4 if args.quick else 20)
        vm_start = results.find(figures.START, "vm")
        if n > 0 and vm_start is not None and vm_start.samples:
            await run_batch(n, results, say)
    finally:
        left = await kernels.stop_all()
        if left:
            say(f"shut down {left} kernel(s) left running")


async def run_batch(n: int, results: Results, say: Progress) -> None:
    """One notebook alone and a batch of ``n``, on the local kernel and on the VM."""
    notebook = batch.write_notebook(WORK_DIR / "batch.ipynb")
    env = {**os.environ, "NIXOS_MAX_CONCURRENT_VMS": "2"}
    single: dict[str, float] = {}
    for runtime in ("local", "vm"):
        kernel = kernel_name(runtime)
        say(f"batch: one notebook alone on {kernel}")
        one = await batch.run(kernel, 1, notebook, WORK_DIR / f"batch-{runtime}-one", env, say)
        if one.failures:
            results.skip(BATCH_ONE, runtime, "s", one.failures[0])
            continue
        single[runtime] = one.wall
        results.row(BATCH_ONE, runtime, "s").samples.append(one.wall)
        say(f"batch: {n} notebooks at once on {kernel} (one alone took {one.wall:.1f} s)")
        done = await batch.run(kernel, n, notebook, WORK_DIR / f"batch-{runtime}", env, say,
                               sample_vms=runtime == "vm")
        note = f"{n} papermill processes started together"
        if runtime == "vm":
            ideal = n * one.wall / 2
            note += f"; NIXOS_MAX_CONCURRENT_VMS=2, ideal {n} x {one.wall:.1f} s / 2 = {ideal:.0f} s"
            results.row(BATCH_IDEAL, runtime, "x", baseline=None,
                        note="1.0 = the two VM slots were never idle and two VMs at once cost nothing extra; "
                             "below 1 is possible: queued runs start papermill while they wait"
                        ).samples.append(done.wall / ideal)
            results.row(BATCH_RSS, runtime, "MiB", baseline=None,
                        note="VmHWM of each VM's QEMU process, sampled every second"
                        ).samples.extend(done.peak_rss_mib.values())
            results.row(BATCH_DISK, runtime, "MiB", baseline=None,
                        note="blocks allocated in each kernel's overlay directory, sampled every second"
                        ).samples.extend(done.peak_overlay_mib.values())
        if done.failures:
            note += f"; {len(done.failures)} of {n} failed, first: {done.failures[0][:200]}"
        results.row(BATCH_WALL, runtime, "s", note=note).samples.append(done.wall)
        say(f"batch: {n} on {kernel} took {done.wall:.1f} s")
    if "vm" in single:
        await run_pool_batch(n, notebook, env, single["vm"], results, say)


async def run_pool_batch(n: int, notebook: Path, env: dict[str, str], one: float, results: Results,
                         say: Progress) -> None:
    """The VM batch again with a warm pool of one (the first papermill process starts the agent)."""
    kernel = kernel_name("vm")
    say(f"batch: {n} notebooks at once on {kernel} with NIXOS_VM_POOL_SIZE=1")
    with pool.pool_on("vm"):
        done = await batch.run(kernel, n, notebook, WORK_DIR / "batch-vm-pool",
                               {**env, "NIXOS_VM_POOL_SIZE": "1"}, say)
    ideal = n * one / 2
    note = (f"{n} papermill processes, NIXOS_MAX_CONCURRENT_VMS=2, NIXOS_VM_POOL_SIZE=1; "
            f"ideal {ideal:.0f} s as without the pool")
    if done.failures:
        note += f"; {len(done.failures)} of {n} failed, first: {done.failures[0][:200]}"
    results.row(BATCH_POOL_WALL, "vm", "s", note=note).samples.append(done.wall)
    results.row(BATCH_POOL_IDEAL, "vm", "x", baseline=None).samples.append(done.wall / ideal)
    say(f"batch: {n} on {kernel} with the pool took {done.wall:.1f} s")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("SANDBOX_KERNELS_STATE_DIR", str(WORK_DIR / "state"))
    say = Progress(sys.stderr)
    results = Results()
    started = dt.datetime.now()
    meta: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"), "mode": "quick" if args.quick else "full",
        "argv": sys.argv[1:] if argv is None else argv, "runtimes": args.runtimes,
        "host": {"cpus": os.cpu_count(), "load_before": os.getloadavg()[0],
                 "others_at_start": other_sandboxes()},
    }
    meta["runtime_notes"] = {"local": "kernelspec python3 (ipykernel in .venv), TCP on 127.0.0.1"}
    if "vm" in args.runtimes:
        meta["runtime_notes"]["vm"] = f"{_accelerator()}; 512 MiB unless NIXOS_VM_DEFAULT_MEMORY_MB is set"
    if "ssh" in args.runtimes:
        meta["runtime_notes"]["ssh"] = f"real sshd on 127.0.0.1, user {sshhost.USER}, /usr/bin/python3"
    if "docker" in args.runtimes:
        meta["runtime_notes"]["docker"] = "ipc sockets, --network none, 1 CPU / 1g limits"
    if "gvisor" in args.runtimes:
        meta["runtime_notes"]["gvisor"] = "the Docker container under runsc (gVisor), platform 'auto'; same limits"
    say(f"benchmark ({meta['mode']}): {', '.join(args.runtimes)}; other sandboxes running: "
        f"{meta['host']['others_at_start']}; load {meta['host']['load_before']:.1f}")
    t0 = time.monotonic()
    status = 0
    try:
        asyncio.run(_main(args, say, results, meta))
    except (KeyboardInterrupt, asyncio.CancelledError):
        say("interrupted: every kernel was shut down; printing what was measured")
        meta["interrupted"] = True
        status = 130
    except Exception:  # a bug in the harness: still report what was measured
        traceback.print_exc()
        meta["error"] = traceback.format_exc(limit=3)
        status = 1
    meta["duration_s"] = time.monotonic() - t0
    meta["host"]["load_after"] = os.getloadavg()[0]
    meta["finished"] = dt.datetime.now().isoformat(timespec="seconds")
    results.finish()
    print(table(results, meta))
    stamp = started.strftime("%Y%m%d-%H%M%S") + ("-quick" if args.quick else "")
    path = write_json(results, meta, args.results, stamp)
    plot = write_plot(results, [figures.START, figures.GOLDEN, figures.WARM], meta, args.results, stamp)
    print(f"\nresults: {path} (and latest.json)")
    print(f"plot: {plot} (and latest.png)" if plot else
          "plot: skipped, matplotlib is not installed (pip install 'sandbox-kernels[bench]')")
    return status


async def _main(args: argparse.Namespace, say: Progress, results: Results, meta: dict[str, Any]) -> None:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    await run(args, say, results, meta)


def _accelerator() -> str:
    try:
        from sandbox_kernels import doctor

        for line in doctor.check("libvirt").details:
            if line.startswith("accelerator:"):
                return line.split(" (")[0].replace("accelerator: qemu", "accelerator: TCG (domain type qemu)")
    except Exception:
        pass
    return ""
