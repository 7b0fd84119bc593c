"""Register gVisor with the Docker engine: one Docker runtime per working gVisor platform.

Run by the set-up as root (``python -m sandbox_kernels.runtimes.gvisor.engine_config``). It
lists the platforms this ``runsc`` has (``runsc help platforms``), probes each once
(``runsc --platform=P --network=none do /bin/true`` under a hard timeout: the ``kvm`` platform
hangs on a host running paravirtual KVM), caches the verdicts keyed by the ``runsc`` version
and the host kernel, and merges ``runsc-<platform>`` entries into ``/etc/docker/daemon.json``.
When that file changed and dockerd runs, dockerd is sent SIGHUP: it reloads its runtimes
without a restart, so kernels that run now are not touched.

Every runtime entry carries ``--network=none`` (gVisor refuses to start in the root network
namespace otherwise) and ``--host-uds=create``: code inside may create unix sockets on a bind
mount (the kernel's ``ipc`` sockets, which the host connects to) but may not open the host's.
"""

from __future__ import annotations

import json
import os
import platform as host_platform
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

DAEMON_JSON = Path("/etc/docker/daemon.json")
RUNTIME_PREFIX = "runsc-"
#: The flags every runsc runtime entry gets (see the module docstring).
RUNSC_ARGS = ("--host-uds=create", "--network=none")
PROBE_TIMEOUT = 20.0


def runtime_name(platform: str) -> str:
    """The Docker runtime name of a gVisor platform (``runsc-ptrace``)."""
    return f"{RUNTIME_PREFIX}{platform}"


def runtime_entry(runsc: str, platform: str) -> dict[str, Any]:
    """The ``daemon.json`` runtime entry of one platform."""
    return {"path": runsc, "runtimeArgs": [f"--platform={platform}", *RUNSC_ARGS]}


def merge_runtimes(config: dict[str, Any], runsc: str, working: list[str],
                   known: list[str]) -> dict[str, Any]:
    """``config`` with a runtime entry for each working platform, and none for a known
    platform that does not work; other runtimes and settings are kept as they are."""
    merged = dict(config)
    runtimes = dict(merged.get("runtimes") or {})
    for name in known:
        runtimes.pop(runtime_name(name), None)
    for name in working:
        runtimes[runtime_name(name)] = runtime_entry(runsc, name)
    if runtimes or "runtimes" in merged:  # an empty map still tells dockerd's reload to drop ours
        merged["runtimes"] = runtimes
    return merged


def known_platforms(runsc: str) -> list[str]:
    """The platforms this ``runsc`` build has (``ptrace``, ``kvm``, ``systrap`` in newer ones)."""
    done = subprocess.run([runsc, "help", "platforms"], capture_output=True, text=True, timeout=30)
    return [line.strip() for line in done.stdout.splitlines() if line.strip().isidentifier()]


def probe(runsc: str, platform: str, timeout: float = PROBE_TIMEOUT) -> str:
    """Run ``/bin/true`` in a throwaway sandbox on ``platform`` (as root).

    Returns:
        "" when it works, else one line saying why not (a hang counts as a failure).
    """
    cmd = [runsc, f"--platform={platform}", "--network=none", "do", "/bin/true"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd="/")
    except subprocess.TimeoutExpired:
        return f"did not finish within {timeout:.0f} s"
    except OSError as e:
        return str(e)
    if done.returncode == 0:
        return ""
    lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
    return lines[-1].strip() if lines else f"exit code {done.returncode}"


def _version(runsc: str) -> str:
    done = subprocess.run([runsc, "--version"], capture_output=True, text=True, timeout=30)
    return done.stdout.splitlines()[0] if done.stdout else "?"


def verdicts(runsc: str, cache_file: Path) -> dict[str, str]:
    """``{platform: problem}`` ("" = works) for every platform, probed once per runsc version
    and host kernel (cached in ``cache_file``)."""
    key = f"{_version(runsc)} {host_platform.release()}"
    try:
        cached = json.loads(cache_file.read_text())
        if cached.get("key") == key:
            return dict(cached["verdicts"])
    except (OSError, ValueError, KeyError):
        pass
    found = {name: probe(runsc, name) for name in known_platforms(runsc)}
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    cache_file.write_text(json.dumps({"key": key, "verdicts": found}))
    return found


def write_atomically(path: Path, config: dict[str, Any]) -> None:
    """Replace ``path`` with ``config`` as JSON (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, path)


def reload_dockerd() -> bool:
    """SIGHUP every running dockerd (it reloads runtimes, no restart). Whether one ran."""
    done = subprocess.run(["pgrep", "-x", "dockerd"], capture_output=True, text=True, timeout=30)
    pids = [int(p) for p in done.stdout.split()]
    for pid in pids:
        os.kill(pid, signal.SIGHUP)
    return bool(pids)


def main(argv: list[str] | None = None) -> int:
    """Register the working platforms; print one line per platform. Exit 1 if none works."""
    import shutil

    from ...cache import cache_dir

    runsc = shutil.which("runsc")
    if runsc is None:
        print("gvisor: runsc is not installed (apt-get install runsc)", file=sys.stderr)
        return 1
    found = verdicts(runsc, cache_dir() / "gvisor" / "platforms.json")
    working = [name for name, problem in found.items() if not problem]
    for name, problem in found.items():
        print(f"gvisor: platform {name}: " + (f"works ({runtime_name(name)})" if not problem
                                              else f"does not work here: {problem}"))
    try:
        current = json.loads(DAEMON_JSON.read_text())
    except FileNotFoundError:
        current = {}
    wanted = merge_runtimes(current, runsc, working, list(found))
    if wanted != current:
        write_atomically(DAEMON_JSON, wanted)
        reloaded = reload_dockerd()
        print(f"gvisor: {DAEMON_JSON} updated" + ("; dockerd reloaded (SIGHUP)" if reloaded else ""))
    return 0 if working else 1


if __name__ == "__main__":
    raise SystemExit(main())
