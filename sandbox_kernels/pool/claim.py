"""A kernel start's side of the pool: claim a ready sandbox and adopt it.

Called from the provisioner's ``pre_launch`` when ``pool_size`` > 0, before any port or file
of the kernel exists. Whatever goes wrong with the pool, the start goes on without it (a
warning says why); a claimed sandbox that cannot be adopted is removed, and the start fails
with the reason.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from ..aio import to_thread
from ..errors import SandboxError
from . import protocol
from .client import PoolClient
from .recipe import Recipe, recipe_for

if TYPE_CHECKING:
    from ..provisioning.base import SandboxProvisioner


async def claim_from_pool(prov: SandboxProvisioner, km: Any, env: dict[str, str],
                          extra_arguments: list[str]) -> bool:
    """Claim a ready sandbox of ``prov``'s configuration and make it ``prov``'s; returns whether
    one was claimed. ``km`` (the kernel manager) gets the pooled kernel's key.

    A cancelled start (Ctrl-C) still finishes the claim it asked for, then removes the sandbox.
    """
    if extra_arguments:
        prov.log.debug("Kernel %s: extra kernel arguments; not using the warm pool", prov.kernel_id)
        return False
    recipe = await recipe_for(prov, getattr(km, "kernel_name", "") or prov.kernel_name, dict(env))
    task = asyncio.ensure_future(_claim(prov, km, recipe))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        if await task:
            await prov.teardown()
        raise


async def _claim(prov: SandboxProvisioner, km: Any, recipe: Recipe) -> bool:
    client = PoolClient(prov.state_root)
    try:
        claim = await to_thread(client.claim, recipe)
    except SandboxError as e:
        prov.log.warning("Kernel %s: the warm pool is unavailable (%s); starting a new sandbox "
                         "(`sandbox-kernels pool status` shows the pool)", prov.kernel_id, e)
        return False
    member, fds = claim.member, claim.fds
    if member is None:
        protocol.close_fds(fds)
        prov.log.info("Kernel %s: no ready sandbox in the warm pool yet; starting a new one "
                      "(the pool fills in the background)", prov.kernel_id)
        return False
    try:
        await prov.adopt(member, fds, claim)  # the pool refills once the kernel is connected
        fds = []
        connection = member["connection"]
        km.session.key = connection["key"].encode()
        km.session.signature_scheme = connection["signature_scheme"]
    except BaseException:
        protocol.close_fds(fds)
        claim.release()
        prov.log.warning("Kernel %s: could not adopt pooled sandbox %s; removing it",
                         prov.kernel_id, prov.sandbox_name)
        await prov.teardown()
        raise
    prov.start_progress.phase("claimed", "claimed a ready sandbox from the warm pool")
    return True
