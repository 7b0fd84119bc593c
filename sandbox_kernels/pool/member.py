"""One pooled sandbox: a kernel started the normal way (a KernelManager and the runtime's own
provisioner, configured exactly as the recipe says), waiting to be handed over.

The member's provisioner is told it is one (its manager's ``pool_member``): it never claims
from a pool itself and never waits in the VM queue (a kernel start always goes first).
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from traitlets import Bool
from traitlets.config import Config

from .recipe import Recipe


class RecipeSpecs(KernelSpecManager):
    """Serves one kernelspec, rebuilt from a recipe (its provisioner settings come from the
    member's config, already as applied: the spec carries none)."""

    def __init__(self, recipe: Recipe, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        spec = dict(recipe.spec)
        metadata = dict(spec.get("metadata") or {})
        provisioner = dict(metadata.get("kernel_provisioner") or {})
        provisioner.pop("config", None)
        metadata["kernel_provisioner"] = provisioner
        spec["metadata"] = metadata
        self.recipe_spec = KernelSpec(**spec)

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        """The recipe's kernelspec, whatever the name."""
        return self.recipe_spec


class PoolMemberManager(AsyncKernelManager):
    """The kernel manager of a pool member (read by the provisioner: ``pool_member``)."""

    pool_member = Bool(True)


class Member:
    """A pooled sandbox with its kernel.

    Attributes:
        id: the member's own id: its sandbox's name, labels and state directory.
        ready_since: monotonic time it became ready (None while starting).
    """

    def __init__(self, recipe: Recipe, log: logging.Logger) -> None:
        self.id = str(uuid.uuid4())
        self.recipe = recipe
        self.log = log
        self.ready_since: float | None = None
        cls_name = recipe.provisioner_class.rsplit(":", 1)[1]
        settings = {k: v for k, v in recipe.settings.items() if k != "pool_size"}
        self.km = PoolMemberManager(
            kernel_id=self.id, kernel_name=recipe.kernel_name,
            kernel_spec_manager=RecipeSpecs(recipe), config=Config({cls_name: settings}), log=log,
        )

    async def start(self) -> None:
        """Start the sandbox and its kernel (the runtime's own start: golden restore, reseed,
        login, fork). On failure nothing of it is left."""
        await self.km.start_kernel(env=dict(self.recipe.env))
        self.ready_since = time.monotonic()
        await self.keep_warm()

    async def hand_over(self) -> tuple[dict[str, Any], list[int]]:
        """Let go of the running sandbox for a claiming process: what it needs to adopt it,
        and the descriptors that go with it (a VM slot). The member is spent after."""
        provisioner = self.km.provisioner
        assert provisioner is not None
        member, fds = await provisioner.detach()
        self.km.cleanup_connection_file()
        self.km.provisioner = None
        return member, fds

    async def keep_warm(self) -> None:
        """Keep it quick to claim (see the runtime's ``keep_warm``)."""
        provisioner = self.km.provisioner
        if provisioner is not None and self.ready_since is not None:
            await provisioner.keep_warm()

    async def alive(self) -> bool:
        """Whether its sandbox and kernel still run (a member can die while it waits: the
        engine restarted, the OOM killer); asked before it is handed over."""
        provisioner = self.km.provisioner
        return provisioner is not None and await provisioner.poll() is None

    async def destroy(self) -> None:
        """Remove the sandbox and the kernel (idempotent)."""
        provisioner, self.km.provisioner = self.km.provisioner, None
        if provisioner is not None:
            await provisioner.teardown()
            self.km.cleanup_connection_file()

    async def memory_bytes(self) -> int:
        """Host memory the member holds (0 if unknown)."""
        provisioner = self.km.provisioner
        return await provisioner.memory_held() if provisioner is not None and self.ready_since else 0
