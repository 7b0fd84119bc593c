"""The extension application: registers the REST handlers under ``/sandbox-kernels/api/``."""

from __future__ import annotations

from jupyter_server.extension.application import ExtensionApp

from .handlers import handlers


class SandboxKernelsExtension(ExtensionApp):
    """Snapshot/rollback REST API for kernels started by sandbox provisioners."""

    name = "jupyter_server_ext"
    extension_url = "/sandbox-kernels/api/runtimes"
    load_other_extensions = True

    def initialize_handlers(self) -> None:
        """Called by jupyter_server when the extension loads."""
        self.handlers.extend(handlers())
