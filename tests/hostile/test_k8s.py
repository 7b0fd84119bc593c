"""Kubernetes: what a kernel pod may reach and how much of its output the host reads
(issue 10, findings 6, 7 and 8), against the real test cluster (tests/infra/k8s).

The test cluster runs pods through the kubelet's dockershim with no network plugin, so
nothing enforces NetworkPolicies there: the tests check that each kernel pod gets its
deny-all policy (through the API, created before the pod and deleted with it) and that the
API server's port-forward, which enters the pod's own network namespace through the kubelet,
still carries the kernel with the policy in place. Whether the policy blocks traffic is the
network plugin's job and is not measured here (testing it would mean sending traffic to an
address other than 127.0.0.1). The ephemeral-storage limit is enforced by the kubelet itself,
so that one is attacked for real: a kernel that writes past it is evicted.
"""

from __future__ import annotations

import json
import os
import resource
import stat
from pathlib import Path
from typing import Any, Iterator

import pytest
from jupyter_client.kernelspec import KernelSpecManager

from helpers.k8s import NAMESPACE, core, network_policies, networking, pods
from hostile.suite import HostileRuntime, HostileSuite
from lifecycle import run_cell, start, wait_until
from sandbox_kernels.errors import SandboxConfigError, SandboxError

pytestmark = [pytest.mark.hostile, pytest.mark.k8s]

MiB = 1 << 20


@pytest.fixture
def kernel(k8s_cluster: str, jp_asyncio_loop: Any) -> Iterator[Any]:
    km, kc = jp_asyncio_loop.run_until_complete(start("sandbox-k8s", timeout=120))
    try:
        yield km, kc
    finally:
        kc.stop_channels()
        if km.has_kernel:
            jp_asyncio_loop.run_until_complete(km.shutdown_kernel(now=True))
        assert not pods(km.kernel_id) and not network_policies(km.kernel_id)


async def test_pod_has_a_deny_all_network_policy_and_storage_limit(kernel: Any) -> None:
    km, kc = kernel
    (name,) = pods(km.kernel_id)
    (policy_name,) = network_policies(km.kernel_id)
    policy = networking().read_namespaced_network_policy(policy_name, NAMESPACE)
    assert policy.spec.pod_selector.match_labels == {"sandbox-kernels/kernel-id": km.kernel_id}
    assert sorted(policy.spec.policy_types) == ["Egress", "Ingress"]
    assert not policy.spec.ingress and not policy.spec.egress  # no rule: nothing allowed
    pod = core().read_namespaced_pod(name, NAMESPACE)
    assert pod.spec.containers[0].resources.limits["ephemeral-storage"] == "2Gi"
    # The kernel is reached through the port-forward with the policy in place, over
    # unix sockets in its 0700 state directory.
    info = json.loads(Path(km.connection_file).read_text())
    assert info["transport"] == "ipc"
    assert stat.S_IMODE(os.lstat(Path(info["ip"]).parent).st_mode) == 0o700
    assert stat.S_IMODE(os.lstat(f"{info['ip']}-{info['iopub_port']}").st_mode) == 0o600
    assert (await run_cell(kc, "print(6 * 7)"))["stdout"] == "42\n"


async def test_admin_may_allow_network(k8s_cluster: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOX_K8S_ALLOW_NETWORK", "1")
    km, kc = await start("sandbox-k8s", timeout=120)
    try:
        assert pods(km.kernel_id) and not network_policies(km.kernel_id)
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)
    assert not pods(km.kernel_id)


async def test_a_kernelspec_cannot_allow_network(k8s_cluster: str, kernelspec_dir: Any) -> None:
    ksm = KernelSpecManager(kernel_dirs=[str(kernelspec_dir("sandbox-k8s", name="k8s-net", allow_network=True))])
    with pytest.raises(SandboxConfigError, match="allow_network"):
        await start("k8s-net", ksm=ksm, timeout=60)
    assert not pods() and not network_policies()


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


async def test_exec_output_flood_is_cut_off(kernel: Any) -> None:
    """A command in the pod that floods stderr (200 MB) and fails: a SandboxError at the cap,
    and this process's memory does not grow by the flood."""
    km, _ = kernel
    process = km.provisioner.kernel.shell
    before = _peak_rss()
    with pytest.raises(SandboxError, match="passed 64 MiB"):
        await _to_thread(process.run, ["sh", "-c", "head -c 200000000 /dev/zero >&2; exit 1"], None, 120)
    grown = _peak_rss() - before
    assert grown < 150 * MiB, f"peak memory grew by {grown / MiB:.0f} MiB"


async def test_planted_huge_log_line_is_read_bounded(kernel: Any) -> None:
    """The kernel appends one 200 MB line to its log file; the host reads the log's tail for
    diagnostics: at most 64 KiB of it."""
    km, kc = kernel
    out = await run_cell(kc, "chunk = b'x' * (1 << 20)\n"
                             "with open('/tmp/sandbox-kernel/kernel.log', 'ab') as log:\n"
                             "    for _ in range(200): log.write(chunk)\n"
                             "print('written')", timeout=300)
    assert out["stdout"] == "written\n", out
    before = _peak_rss()
    tail = await km.provisioner.diagnostics()
    assert 0 < len(tail) <= 70 * 1024, len(tail)
    assert _peak_rss() - before < 150 * MiB


async def test_storage_past_the_limit_evicts_the_pod(k8s_cluster: str, kernelspec_dir: Any) -> None:
    """The kubelet enforces ephemeral-storage: a kernel writing past its limit is evicted and
    reported dead; its pod and policy are removed on shutdown."""
    ksm = KernelSpecManager(kernel_dirs=[str(kernelspec_dir("sandbox-k8s", name="k8s-disk",
                                                            ephemeral_storage="50Mi"))])
    km, kc = await start("k8s-disk", ksm=ksm, timeout=120)
    try:
        await run_cell(kc, "f = open('/tmp/fill', 'wb')\nfor _ in range(150): f.write(b'x' * (1 << 20))\n"
                           "f.close()", timeout=120)
        assert await wait_until(lambda: _to_thread(_evicted, km.kernel_id), timeout=180, step=1), \
            "the kubelet did not evict the pod"
        assert await wait_until(_not_alive(km), timeout=60), "the kernel is not reported dead"
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)
    assert not pods(km.kernel_id) and not network_policies(km.kernel_id)


def _evicted(kernel_id: str) -> bool:
    for name in pods(kernel_id):
        pod = core().read_namespaced_pod(name, NAMESPACE)
        if pod.status.phase == "Failed" and pod.status.reason == "Evicted":
            return True
    return False


def _not_alive(km: Any) -> Any:
    async def check() -> bool:
        return not await km.is_alive()
    return check


async def _to_thread(fn: Any, *args: Any) -> Any:
    import asyncio

    return await asyncio.to_thread(fn, *args)


class TestK8sHostile(HostileSuite):
    """The shared hostile suite on a kernel pod. The pod's memory limit is the kernelspec's
    resources (1Gi by default). Its process limit is the node's (the kubelet's podPidsLimit;
    the test cluster's kubelet runs with --pod-max-pids 1024): a bomb that reaches it also
    stops the runtime's own execs into the pod, so the bomb here stays bounded by its count.
    Its disk is bounded by ephemeral-storage (2Gi), whose eviction test_storage_past_the_limit
    attacks with a small limit; the suite's fill stays under it."""

    @pytest.fixture
    def hostile(self, k8s_cluster: str) -> HostileRuntime:
        return HostileRuntime(kernel_name="sandbox-k8s", sandbox_exists=lambda kid: bool(pods(kid)),
                              start_timeout=180, exec_timeout=120, flood_bytes=256 * MiB,
                              process_limit=False)
