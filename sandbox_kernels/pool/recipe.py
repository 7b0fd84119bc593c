"""What a warm pool is keyed by: everything that makes two kernels' sandboxes interchangeable.

A :class:`Recipe` holds the provisioner class, the kernelspec (command, env, metadata), every
effective setting of the provisioner (admin's and kernelspec's, as applied), the environment
that reaches the kernel, and the identity of the images (a rebuilt image is another recipe).
Two kernel starts share a pool exactly when their recipes have the same :meth:`Recipe.key`:
a change of image, memory or kernelspec makes a new pool, and the agent drains the old one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import SandboxConfigError

if TYPE_CHECKING:
    from ..provisioning.base import SandboxProvisioner

#: Variables passed through per notebook session: a pooled kernel started before the session
#: cannot have them, so they are left out (``__session__`` is then unset in a claimed kernel).
PER_SESSION_ENV = frozenset({"JPY_SESSION_NAME"})
#: Settings that size the pool rather than describe its sandboxes (not part of the key).
POOL_SETTINGS = frozenset({"pool_size", "pool_idle_timeout"})


@dataclass
class Recipe:
    """A pool's configuration; JSON-serialisable (it travels to the agent)."""

    provisioner_class: str  # "module:Class"
    kernel_name: str
    spec: dict[str, Any]  # argv, env, display_name, language, metadata
    settings: dict[str, Any]  # the provisioner's effective config traits
    env: dict[str, str]  # what reaches the kernel
    identity: dict[str, Any] = field(default_factory=dict)  # images, by content or file identity
    runtime: str = ""

    @property
    def target(self) -> int:
        """How many ready sandboxes the pool keeps."""
        return int(self.settings.get("pool_size", 0))

    @property
    def idle_timeout(self) -> float:
        """Seconds without a start asking before the pool is removed."""
        return float(self.settings.get("pool_idle_timeout", 600.0))

    def key(self) -> str:
        """A digest of everything but the pool's size and idle time."""
        described = asdict(self)
        described["settings"] = {k: v for k, v in self.settings.items() if k not in POOL_SETTINGS}
        data = json.dumps(described, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(data.encode()).hexdigest()[:24]

    def to_dict(self) -> dict[str, Any]:
        """The recipe as sent to the agent."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        """Inverse of :meth:`to_dict`.

        Raises:
            SandboxConfigError: ``data`` is not a recipe.
        """
        try:
            return cls(**data)
        except TypeError as e:
            raise SandboxConfigError(f"not a pool recipe: {e}") from e


def settings_of(prov: SandboxProvisioner) -> dict[str, Any]:
    """The provisioner's effective value of every config setting, JSON-serialisable."""
    values = {}
    for name in sorted(prov.class_trait_names(config=True)):
        value = getattr(prov, name)
        if isinstance(value, tuple):
            value = list(value)
        json.dumps(value)  # a setting that is not JSON would be a bug: fail loudly
        values[name] = value
    return values


def spec_of(prov: SandboxProvisioner) -> dict[str, Any]:
    """The kernelspec, as a KernelSpec can be rebuilt from it."""
    spec = prov.kernel_spec
    return {"argv": list(spec.argv), "env": dict(spec.env or {}), "display_name": spec.display_name,
            "language": spec.language, "metadata": dict(spec.metadata or {}),
            "interrupt_mode": spec.interrupt_mode}


async def recipe_for(prov: SandboxProvisioner, kernel_name: str, env: dict[str, str]) -> Recipe:
    """The recipe of ``prov``'s configuration; ``env`` is the environment a start passes."""
    kernel_env = {k: v for k, v in prov.kernel_env(env).items() if k not in PER_SESSION_ENV}
    cls = type(prov)
    return Recipe(
        provisioner_class=f"{cls.__module__}:{cls.__qualname__}", kernel_name=kernel_name,
        spec=spec_of(prov), settings=settings_of(prov), env=kernel_env,
        identity=await prov.pool_identity(), runtime=prov.runtime,
    )
