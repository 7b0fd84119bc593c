"""Orphans: a kernel whose owning process was SIGKILLed (what a crashed server leaves).

Shared by the reap tests (test_reliability.py), the server-start reap (test_snapshot_api.py)
and the Kubernetes suite.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

_OWNER = textwrap.dedent("""
    import asyncio, sys
    from jupyter_client.manager import AsyncKernelManager

    async def main():
        km = AsyncKernelManager(kernel_name=sys.argv[1])
        await km.start_kernel()
        print(km.kernel_id, flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
""")


def start_orphan(kernel_name: str) -> str:
    """Start a ``kernel_name`` kernel in another process, SIGKILL that process (no clean-up
    runs, as when a server crashes) and return the kernel id whose sandbox it left."""
    owner = subprocess.Popen([sys.executable, "-c", _OWNER, kernel_name], stdout=subprocess.PIPE, text=True)
    try:
        kernel_id = owner.stdout.readline().strip()  # type: ignore[union-attr]
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    assert kernel_id, f"the {kernel_name} kernel did not start in the owner process"
    return kernel_id


def docker_containers(kernel_id: str) -> list[str]:
    """Ids of the Docker containers labelled with ``kernel_id`` (running or not)."""
    out = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=sandbox-kernels.kernel-id={kernel_id}"],
                         capture_output=True, text=True, check=True)
    return out.stdout.split()
