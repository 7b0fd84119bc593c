"""The build cache: images and binaries under ``~/.cache/sandbox-kernels/``, keyed by recipe hash."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def cache_dir() -> Path:
    """The cache root (``$SANDBOX_KERNELS_CACHE`` or ``$XDG_CACHE_HOME/sandbox-kernels``)."""
    explicit = os.environ.get("SANDBOX_KERNELS_CACHE")
    if explicit:
        root = Path(explicit)
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sandbox-kernels"
    root.mkdir(parents=True, exist_ok=True)
    return root


def recipe_hash(recipe: Any, *files: Path) -> str:
    """A short, stable hash of a JSON-able recipe plus the contents of ``files``."""
    h = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode())
    for path in files:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]
