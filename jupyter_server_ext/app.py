"""The extension application: registers the REST handlers under ``/sandbox-kernels/api/``."""

from __future__ import annotations

import threading

from jupyter_server.extension.application import ExtensionApp
from traitlets import Bool

from jupyter_server_ext.events import StartEventSink
from jupyter_server_ext.handlers import handlers


class SandboxKernelsExtension(ExtensionApp):
    """Snapshot/rollback REST API for kernels started by sandbox provisioners."""

    name = "jupyter_server_ext"
    extension_url = "/sandbox-kernels/api/runtimes"
    load_other_extensions = True
    #: The start-phase sink of this server (see :mod:`.events`), once initialised.
    start_events: StartEventSink | None = None

    reap_on_start = Bool(True, config=True, help=(
        "At start-up, remove in the background the sandboxes (containers, VMs, pods, overlays) "
        "that a Jupyter server or papermill process of this host left behind when it died "
        "(what `sandbox-kernels reap --yes` removes). Sandboxes of live processes are never "
        "touched."))

    def initialize_handlers(self) -> None:
        """Called by jupyter_server when the extension loads."""
        self.handlers.extend(handlers())

    def initialize_settings(self) -> None:
        """Emit kernel start phases as server events (:mod:`.events`), and start the background
        reap of a dead server's sandboxes (see ``reap_on_start``)."""
        if self.serverapp is not None and getattr(self.serverapp, "event_logger", None) is not None:
            io_loop = getattr(self.serverapp, "io_loop", None)
            self.start_events = StartEventSink(self.serverapp.event_logger, self.log)
            self.start_events.install(getattr(io_loop, "asyncio_loop", None))
        if self.reap_on_start:
            threading.Thread(target=self._reap, name="sandbox-kernels-reap", daemon=True).start()

    async def stop_extension(self) -> None:
        """Called by jupyter_server when it stops: no more start events from this server."""
        if self.start_events is not None:
            self.start_events.uninstall()
            self.start_events = None

    def _reap(self) -> None:
        from sandbox_kernels.reap import reap

        config = self.serverapp.config if self.serverapp is not None else self.config
        try:
            removed = reap(config=config)  # the admin's settings (namespace, images_dir, ...)
        except Exception as e:  # never let a clean-up problem take the server down
            self.log.warning("sandbox-kernels: reaping orphaned sandboxes failed: %s", e)
            return
        for line in removed:
            self.log.warning("sandbox-kernels: %s (its owner process is gone)", line)
