"""Kernel start phases as Jupyter server events.

The provisioners report each phase of a kernel's start to
:mod:`sandbox_kernels.provisioning.start_progress`; :class:`StartEventSink` is the sink the
server extension registers there. It emits every phase on the server's ``jupyter_events``
logger under our own schema (:data:`SCHEMA_ID`, ``event_schemas/kernel-start.yaml``), so JupyterLab
receives it over ``/api/events/subscribe`` like the server's own ``kernel_actions`` events.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from jupyter_events import EventLogger
from jupyter_events.schema_registry import SchemaRegistryException

from sandbox_kernels.provisioning import start_progress

#: The schema's ``$id``: what JupyterLab filters the event stream on.
SCHEMA_ID = "https://events.sandbox-kernels.org/jupyter_server_ext/kernel-start/v1"
#: The schema file, shipped in the package.
SCHEMA_PATH = Path(__file__).resolve().parent / "event_schemas" / "kernel-start.yaml"

#: The fields an event carries (the schema's properties).
FIELDS = ("kernel_id", "kernel_name", "runtime", "phase", "message", "elapsed", "queue_position")


def register_schema(event_logger: EventLogger) -> None:
    """Register the kernel-start schema on ``event_logger`` (once; again is harmless)."""
    try:
        event_logger.register_event_schema(SCHEMA_PATH)
    except SchemaRegistryException:
        pass  # already registered (a second extension app on the same server)


class StartEventSink:
    """Emits start phases on a server's event logger, on the server's event loop.

    Phases are reported from the provisioners' coroutines, on the server's loop; a phase
    reported from another thread is handed over to that loop (jupyter_events schedules its
    listeners as tasks of the running loop).

    Args:
        event_logger: the server's ``event_logger``.
        log: where a failed emission is reported (it never fails a kernel start).
    """

    def __init__(self, event_logger: EventLogger, log: logging.Logger) -> None:
        self.event_logger = event_logger
        self.log = log
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Register the schema and start receiving phases. ``loop``: the server's event loop
        (default: the running one)."""
        register_schema(self.event_logger)
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
        self._loop = loop
        start_progress.add_sink(self)

    def uninstall(self) -> None:
        """Stop receiving phases (called when the extension stops)."""
        start_progress.remove_sink(self)

    def __call__(self, event: dict[str, Any]) -> None:
        data = {name: event.get(name) for name in FIELDS}
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        loop = self._loop
        if loop is None or running is loop or loop.is_closed():
            self.emit(data)
        else:
            loop.call_soon_threadsafe(self.emit, data)

    def emit(self, data: dict[str, Any]) -> None:
        """Emit one phase event (on the loop's thread)."""
        try:
            self.event_logger.emit(schema_id=SCHEMA_ID, data=data)
        except Exception as e:  # a bad event is our bug, never the kernel's failure
            self.log.warning("sandbox-kernels: could not emit start phase %s: %s",
                             data.get("phase"), e)
