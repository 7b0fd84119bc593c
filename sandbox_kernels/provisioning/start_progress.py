"""The phases of one kernel's start, for the people waiting on it.

A provisioner reports where its start is (waiting for a VM slot, restoring, reseeding,
connecting, starting the kernel, claimed from the pool, ready, failed) through a
:class:`StartProgress`. Each phase goes to the log (papermill, nbclient: the log is all there
is) and to every registered sink: the server extension registers one that emits it as a
``jupyter_events`` event, which JupyterLab receives over ``/api/events/subscribe``.

An event is a plain dict::

    {"kernel_id": "...", "kernel_name": "sandbox-nixos-vm", "runtime": "libvirt",
     "phase": "restoring", "message": "restoring the VM from its golden snapshot",
     "elapsed": 1.42, "queue_position": null}
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

#: Phase names, in the order a start usually goes through them.
PHASES = ("queued", "claimed", "creating", "booting", "restoring", "reseeding", "connecting",
          "starting", "ready", "failed")

Sink = Callable[[dict[str, Any]], None]

_sinks: list[Sink] = []


def add_sink(sink: Sink) -> None:
    """Send every start phase of this process to ``sink`` too (called with the event dict;
    must not block). Idempotent."""
    if sink not in _sinks:
        _sinks.append(sink)


def remove_sink(sink: Sink) -> None:
    """Stop sending phases to ``sink``."""
    if sink in _sinks:
        _sinks.remove(sink)


class StartProgress:
    """Reports one kernel's start phases to the log and to the registered sinks.

    Args:
        kernel_id: the kernel whose start this is.
        kernel_name: its kernelspec's name (what the user picked).
        runtime: the runtime's short name ("docker", "libvirt", ...).
        log: where the phases are logged (info level; a failure at warning).
    """

    def __init__(self, kernel_id: str, kernel_name: str, runtime: str, log: logging.Logger) -> None:
        self.kernel_id = kernel_id
        self.kernel_name = kernel_name
        self.runtime = runtime
        self.log = log
        self.phase_name = ""
        self._started = time.monotonic()

    def begin(self) -> None:
        """A new start (the first, or a restart): elapsed times count from now."""
        self._started = time.monotonic()
        self.phase_name = ""

    @property
    def elapsed(self) -> float:
        """Seconds since :meth:`begin`."""
        return time.monotonic() - self._started

    def phase(self, phase: str, message: str, queue_position: int | None = None) -> None:
        """Enter ``phase`` (one of :data:`PHASES`); ``message`` says what happens, in words a
        user understands. ``queue_position``: 1-based place in the VM queue while queued."""
        if phase not in PHASES:
            raise ValueError(f"unknown start phase {phase!r}; one of {', '.join(PHASES)}")
        self.phase_name = phase
        event = {
            "kernel_id": self.kernel_id, "kernel_name": self.kernel_name, "runtime": self.runtime,
            "phase": phase, "message": message, "elapsed": round(self.elapsed, 3),
            "queue_position": queue_position,
        }
        level = logging.WARNING if phase == "failed" else logging.INFO
        self.log.log(level, "Kernel %s (%s): %s (%.1f s)", self.kernel_id, self.kernel_name,
                     message, event["elapsed"])
        for sink in list(_sinks):
            try:
                sink(event)
            except Exception as e:  # a broken sink never fails a kernel start
                self.log.debug("start-phase sink %r failed: %s", sink, e)
