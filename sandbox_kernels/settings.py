"""Helpers for settings: traits whose defaults come from environment variables, and parsers.

Every setting of a provisioner is a traitlets trait, so it can be set from a kernelspec's
``metadata.kernel_provisioner.config``, from a Jupyter config file, or, through the default
methods made here, from an environment variable. The environment is read when the default is
first needed, never at import time.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable

from traitlets import TraitError, default

from .errors import SandboxConfigError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
ENV_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def env_default(trait_name: str, variable: str) -> Callable[[Any], Any]:
    """Make a traitlets ``@default`` method that reads ``variable`` from the environment.

    Use it in a class body: ``_memory_default = env_default("memory", "SANDBOX_DOCKER_MEMORY")``.
    An unset or empty variable falls back to the trait's static default.

    Raises:
        SandboxConfigError: the variable holds a value the trait cannot take.
    """

    @default(trait_name)
    def _default(self: Any) -> Any:
        trait = self.traits()[trait_name]
        raw = os.environ.get(variable, "")
        if raw == "":
            return trait.default_value
        try:
            value = trait.from_string(raw)
            trait.validate(self, value)
        except (TraitError, ValueError) as e:
            raise SandboxConfigError(
                f"environment variable {variable}={raw!r} is not valid for setting "
                f"'{trait_name}': {e}. Unset it or give a valid value."
            ) from e
        return value

    return _default


def parse_size(value: str | int, setting: str) -> int:
    """Parse a memory or disk size such as ``512m``, ``2g``, ``1.5GiB`` or ``1073741824``.

    Returns:
        The size in bytes.

    Raises:
        SandboxConfigError: ``value`` is not a positive size; the message names ``setting``.
    """
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(str(value))
        if not match:
            raise SandboxConfigError(
                f"{setting}={value!r} is not a size: use a number with an optional unit, "
                f"for example '512m' or '2g'."
            )
        size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if size <= 0:
        raise SandboxConfigError(f"{setting}={value!r} must be greater than zero.")
    return size


def check_name(value: str, what: str) -> str:
    """Check ``value`` against the strict name pattern used for ids, labels and snapshot names.

    Raises:
        SandboxConfigError: the name has characters outside ``[A-Za-z0-9_.-]``, starts with
            a dot or dash, or is longer than 63 characters.
    """
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        raise SandboxConfigError(
            f"{what} {value!r} is not allowed: use 1-63 letters, digits, '_', '.' or '-', "
            f"starting with a letter or digit."
        )
    return value


def check_env(env: dict[str, str]) -> dict[str, str]:
    """Check environment variable names; values are passed as data and may hold anything.

    Raises:
        SandboxConfigError: a name is not a valid shell identifier, or a value is not text.
    """
    for name, value in env.items():
        if not ENV_NAME_PATTERN.fullmatch(name):
            raise SandboxConfigError(
                f"environment variable name {name!r} in the kernelspec 'env' is not allowed: "
                f"use letters, digits and '_', not starting with a digit."
            )
        if not isinstance(value, str) or "\0" in value:
            raise SandboxConfigError(f"environment variable {name} must be text without NUL bytes.")
    return env


def default_state_root() -> str:
    """Where per-kernel state lives unless ``state_root`` is set.

    ``$SANDBOX_KERNELS_STATE_DIR``, else ``$XDG_RUNTIME_DIR/sandbox-kernels``, else
    ``/tmp/sandbox-kernels-<uid>``. The CLI uses the same rule to find a kernel's control socket.
    """
    explicit = os.environ.get("SANDBOX_KERNELS_STATE_DIR")
    if explicit:
        return explicit
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return os.path.join(xdg, "sandbox-kernels")
    return f"/tmp/sandbox-kernels-{os.getuid()}"
