"""Who may set what: a kernelspec may narrow a sandbox's isolation, never widen it.

Settings reach a provisioner from three places, trusted differently:

* the server admin: Jupyter config files (``c.DockerProvisioner.network = "bridge"``) and the
  server's environment (``SANDBOX_DOCKER_NETWORK``). May widen isolation.
* a kernelspec's ``metadata.kernel_provisioner.config``: a file anyone with a Jupyter data
  directory can write, notebook users included. May only narrow.
* code in the kernel: gets what the sandbox grants, nothing else.

A trait that widens isolation or reaches host resources carries a ``widen`` tag saying how a
kernelspec value is compared with the admin's value (the trait's value from config and
environment, before the kernelspec is applied):

``"admin"``
    only the admin sets it; a kernelspec may repeat the admin's value (or, with a
    ``narrowest`` tag, choose that value, e.g. Docker ``network="none"``).
``"true"`` / ``"false"``
    a bool whose ``True`` (``False``) widens: a kernelspec may set it only to the other value
    or to what the admin already allows.
``"higher"``
    a number where more is wider: a kernelspec may lower it.
``"subset"``
    a list where more entries are wider: a kernelspec may keep some of the admin's entries.
a tuple of values, narrowest first
    a kernelspec may choose the admin's value or one before it (``("ipc", "tcp")``).

Untagged settings (memory, image, timeouts, ...) a kernelspec sets freely within their
trait's own bounds.
"""

from __future__ import annotations

import re
from typing import Any

from traitlets import HasTraits, TraitError, TraitType

from .errors import SandboxConfigError

_ENV_IN_HELP = re.compile(r"Env: ([A-Z][A-Z0-9_]*)")


def apply_kernelspec_config(obj: HasTraits, config: dict[str, Any]) -> None:
    """Set ``config`` (a kernelspec's provisioner config) on ``obj``, refusing widenings.

    ``obj`` already holds the admin's values (Jupyter config and environment).

    Raises:
        SandboxConfigError: a value is invalid for its trait, or widens a tagged setting; the
            message names the setting and where an admin sets it.
    """
    for name, raw in config.items():
        trait = obj.traits()[name]
        try:
            value = trait.validate(obj, raw)
        except TraitError as e:
            raise SandboxConfigError(
                f"invalid kernelspec setting {name!r} for {type(obj).__name__}: {e}") from e
        rule = trait.metadata.get("widen")
        if rule is not None:
            admin = getattr(obj, name)
            if not _narrows(rule, value, admin, trait):
                raise SandboxConfigError(_refusal(obj, name, value, admin, trait))
        try:
            setattr(obj, name, value)
        except TraitError as e:
            raise SandboxConfigError(
                f"invalid kernelspec setting {name!r} for {type(obj).__name__}: {e}") from e


def widening_settings(cls: type[HasTraits]) -> dict[str, Any]:
    """The tagged settings of ``cls`` and their rules (for documentation and ``doctor``)."""
    return {name: trait.metadata["widen"]
            for name, trait in cls.class_traits(config=True).items() if "widen" in trait.metadata}


def _narrows(rule: Any, value: Any, admin: Any, trait: TraitType) -> bool:
    if value == admin:
        return True
    if rule == "admin":
        return "narrowest" in trait.metadata and value == trait.metadata["narrowest"]
    if rule == "true":
        return value is False
    if rule == "false":
        return value is True
    if rule == "higher":
        return value <= admin
    if rule == "subset":
        return set(value) <= set(admin)
    if isinstance(rule, tuple):
        return value in rule and admin in rule and rule.index(value) <= rule.index(admin)
    raise ValueError(f"unknown widen rule {rule!r}")  # a programming error, not user input


def _refusal(obj: HasTraits, name: str, value: Any, admin: Any, trait: TraitType) -> str:
    rule = trait.metadata["widen"]
    if rule == "admin":
        values = [admin] + [v for v in [trait.metadata.get("narrowest", admin)] if v != admin]
        allowed = " or ".join(map(repr, values))
    elif rule in ("true", "false"):
        allowed = repr(rule == "false")
    elif rule == "higher":
        allowed = f"at most {admin!r}"
    elif rule == "subset":
        allowed = f"a subset of {admin!r}"
    else:
        allowed = " or ".join(map(repr, rule[: rule.index(admin) + 1] if admin in rule else [admin]))
    where = f"c.{type(obj).__name__}.{name} in a Jupyter config file"
    env = _ENV_IN_HELP.search(trait.help or "")
    if env:
        where += f" or the server's environment variable {env.group(1)}"
    return (f"kernelspec setting {name}={value!r} widens the sandbox's isolation, and a "
            f"kernelspec may only narrow it (allowed here: {allowed}). Only a server admin can "
            f"widen it, with {where}.")
