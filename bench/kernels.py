"""Start, time and always shut down kernels; run cells and count their output.

:class:`Kernels` is the only place the benchmark starts kernels. It remembers every kernel it
started until that kernel is shut down, so ``stop_all()`` in the run's outermost ``finally``
(reached on errors, Ctrl-C and SIGTERM alike) leaves nothing running.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from dataclasses import dataclass
from typing import Any, Callable

from jupyter_client.manager import AsyncKernelManager

LOCAL_KERNEL = "python3"


class BenchError(Exception):
    """A measurement could not be taken (a cell failed, a kernel did not start)."""


@dataclass
class Kernel:
    """A started kernel with a ready client.

    Attributes:
        km: its manager (``km.provisioner`` is the runtime's provisioner).
        kc: an async client whose channels are running.
        start_seconds: from ``km.start_kernel()`` to the first ``kernel_info`` reply (the
            client's ``wait_for_ready``, which also waits for IOPub, as nbclient does).
    """

    km: AsyncKernelManager
    kc: Any
    start_seconds: float

    @property
    def kernel_id(self) -> str:
        return str(self.km.kernel_id)


class Kernels:
    """Every kernel of the run: started here, shut down here."""

    def __init__(self, start_timeout: float = 600.0) -> None:
        self.start_timeout = start_timeout
        self._live: dict[int, tuple[AsyncKernelManager, Any]] = {}

    async def start(self, kernel_name: str) -> Kernel:
        """Start ``kernel_name`` and wait until it answers ``kernel_info``.

        Raises:
            BenchError: it did not start; whatever was started is shut down first.
        """
        km = AsyncKernelManager(kernel_name=kernel_name)
        kc = None
        self._live[id(km)] = (km, None)
        extra: dict[str, Any] = {}
        if kernel_name == LOCAL_KERNEL:
            # ipykernel's "running over TCP without encryption" warning would break the table.
            extra = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        started = time.perf_counter()
        try:
            await km.start_kernel(**extra)
            kc = km.client()
            self._live[id(km)] = (km, kc)
            kc.start_channels()
            await kc.wait_for_ready(timeout=self.start_timeout)
        except Exception as e:
            await self._shutdown(km, kc, now=True)
            raise BenchError(f"{kernel_name} did not start: {type(e).__name__}: {e}") from e
        except BaseException:
            await self._shutdown(km, kc, now=True)
            raise
        return Kernel(km, kc, time.perf_counter() - started)

    async def restart(self, kernel: Kernel) -> float:
        """Restart the kernel in its sandbox (``restart_kernel(now=True)``) until ready again.

        Returns:
            Seconds from the restart call to the first ``kernel_info`` reply.
        """
        started = time.perf_counter()
        await kernel.km.restart_kernel(now=True)
        await kernel.kc.wait_for_ready(timeout=self.start_timeout)
        return time.perf_counter() - started

    async def stop(self, kernel: Kernel) -> float:
        """Shut the kernel down gracefully (forcefully if that fails); returns the seconds taken."""
        started = time.perf_counter()
        await self._shutdown(kernel.km, kernel.kc, now=False)
        return time.perf_counter() - started

    async def stop_all(self) -> int:
        """Shut down every kernel still running (used on every exit path); returns how many."""
        live = list(self._live.values())
        for km, kc in live:
            await self._shutdown(km, kc, now=True)
        return len(live)

    async def _shutdown(self, km: AsyncKernelManager, kc: Any, now: bool) -> None:
        self._live.pop(id(km), None)
        if kc is not None:
            kc.stop_channels()
        try:
            await km.shutdown_kernel(now=now)
        except Exception:
            if now:
                with contextlib.suppress(Exception):
                    await km.cleanup_resources()
                return
            with contextlib.suppress(Exception):
                await km.shutdown_kernel(now=True)


async def execute(kc: Any, code: str, timeout: float = 600.0,
                  hook: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run ``code`` and wait for its reply and for the kernel to go idle (all output received).

    Raises:
        BenchError: the cell raised, or did not finish within ``timeout``.
    """
    try:
        reply = await kc.execute_interactive(code, output_hook=hook or _ignore, timeout=timeout)
    except TimeoutError as e:
        raise BenchError(f"cell did not finish within {timeout:g} s: {code[:60]!r}") from e
    content = reply["content"]
    if content.get("status") != "ok":
        raise BenchError(f"cell failed: {content.get('ename')}: {content.get('evalue')}")
    return dict(content)


async def roundtrips(kc: Any, count: int, warmup: int = 5) -> list[float]:
    """Latency in ms of ``count`` executions of ``pass`` (after ``warmup`` unmeasured ones)."""
    for _ in range(warmup):
        await execute(kc, "pass", timeout=120)
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        await execute(kc, "pass", timeout=120)
        samples.append((time.perf_counter() - started) * 1000)
    return samples


CHUNK = 64 * 1024


async def stdout_throughput(kc: Any, total: int) -> tuple[float, str]:
    """MiB/s of a cell that writes ``total`` bytes to stdout in 64 KiB writes, as received.

    Returns:
        The rate, and any other stream text that arrived meanwhile (e.g. ipykernel's
        "IOStream.flush timed out" on stderr when its IOPub thread falls behind), else "".

    Raises:
        BenchError: fewer stdout bytes arrived than were written.
    """
    chunks = total // CHUNK
    code = ("import sys\n_c = 'x' * %d + '\\n'\nfor _ in range(%d):\n    sys.stdout.write(_c)\n"
            "sys.stdout.flush()\n" % (CHUNK - 1, chunks))
    received = 0
    stray: list[str] = []

    def hook(msg: dict[str, Any]) -> None:
        nonlocal received
        if msg["msg_type"] == "stream":
            text = msg["content"]["text"]
            if msg["content"]["name"] == "stdout":
                received += len(text)
            other = text.replace("x", "").replace("\n", "")
            if other or msg["content"]["name"] != "stdout":
                stray.append(f"{msg['content']['name']}: {text.strip()[:80]}")

    started = time.perf_counter()
    await execute(kc, code, hook=hook)
    seconds = time.perf_counter() - started
    if received < chunks * CHUNK:
        raise BenchError(f"stdout: received {received} of {chunks * CHUNK} bytes; other output: {stray[:3]}")
    return received / 2**20 / seconds, "; ".join(stray[:3])


async def display_throughput(kc: Any, total: int) -> float:
    """MiB/s of a cell whose result is one ``text/html`` repr of ``total`` bytes, as received.

    Raises:
        BenchError: the result did not arrive whole.
    """
    code = ("class _Big:\n    def _repr_html_(self):\n        return 'x' * %d\n"
            "    def __repr__(self):\n        return 'big'\n_Big()\n" % total)
    received = 0

    def hook(msg: dict[str, Any]) -> None:
        nonlocal received
        if msg["msg_type"] in ("execute_result", "display_data"):
            received += len(msg["content"]["data"].get("text/html", ""))

    started = time.perf_counter()
    await execute(kc, code, hook=hook)
    seconds = time.perf_counter() - started
    if received != total:
        raise BenchError(f"display data: received {received} of {total} bytes")
    return received / 2**20 / seconds


def _ignore(_msg: dict[str, Any]) -> None:
    pass
