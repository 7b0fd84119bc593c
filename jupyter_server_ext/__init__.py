"""jupyter_server extension: snapshot and rollback of sandbox kernels, and the runtimes report.

Enabled automatically by the ``jupyter-config`` file installed with the package; the
JupyterLab panel (``panel/``, built into ``labextension/``) is its user interface.
"""

from __future__ import annotations

from typing import Any


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    from jupyter_server_ext.app import SandboxKernelsExtension

    return [{"module": "jupyter_server_ext", "app": SandboxKernelsExtension}]


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    return [{"src": "labextension", "dest": "sandbox-kernels-panel"}]
