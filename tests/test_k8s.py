"""The Kubernetes runtime against a real one-node cluster (tests/infra/k8s, built from Debian's
source package, pods on the local Docker engine)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from helpers.k8s import INFRA, NAMESPACE, core as _core, delete as _delete, network_policies, pods as _pods
from lifecycle import LifecycleSuite, Runtime, run_cell, start
from sandbox_kernels.errors import SandboxError

pytestmark = pytest.mark.k8s


class TestK8sLifecycle(LifecycleSuite):
    @pytest.fixture
    def runtime(self, k8s_cluster: str) -> Runtime:
        return Runtime(
            kernel_name="sandbox-k8s",
            sandbox_exists=lambda kid: bool(_pods(kid)),
            destroy_externally=_delete,
            bad_settings=[
                ({"image_pull_policy": "Sometimes"}, "image_pull_policy"),
                ({"namespace": "Not_A_Namespace"}, "namespace"),
                ({"resources": {"limits": {"memory": "lots"}}}, "memory"),
                ({"node_selector": {"bad key!": "x"}}, "node_selector"),
                ({"tolerations": [{"key": "a", "colour": "blue"}]}, "tolerations"),
                ({"colour": "blue"}, "colour"),
            ],
            start_timeout=90,
        )


async def _start_failure(kernelspec_dir: Any, **config: Any) -> str:
    from jupyter_client.kernelspec import KernelSpecManager

    ksm = KernelSpecManager(kernel_dirs=[str(kernelspec_dir("sandbox-k8s", name="k8s-bad", **config))])
    started = time.monotonic()
    with pytest.raises(SandboxError) as info:
        await start("k8s-bad", ksm=ksm, timeout=60)
    assert time.monotonic() - started < 45, "a pod that cannot start must fail the launch quickly"
    assert not _pods(), "the failed pod must be deleted"
    return str(info.value)


async def test_missing_image_fails_with_the_pods_reason(k8s_cluster: str, kernelspec_dir: Any) -> None:
    text = await _start_failure(kernelspec_dir, image="sandbox-kernels/no-such-image:1")
    assert "ErrImageNeverPull" in text, text


async def test_unschedulable_pod_fails_with_the_schedulers_reason(k8s_cluster: str) -> None:
    from jupyter_client.manager import AsyncKernelManager
    from traitlets.config import Config

    # node_selector is an admin setting (a kernelspec may not set it): from the Jupyter config.
    config = Config({"KubernetesProvisioner": {"node_selector": {"sandbox-kernels/no-such-node": "x"},
                                               "schedule_timeout": 2.0}})
    km = AsyncKernelManager(kernel_name="sandbox-k8s", config=config)
    started = time.monotonic()
    with pytest.raises(SandboxError) as info:
        await km.start_kernel()
    assert time.monotonic() - started < 45, "a pod that cannot start must fail the launch quickly"
    assert not _pods() and not network_policies(), "the failed pod and its policy must be deleted"
    text = str(info.value)
    # 1.20's scheduler words it "didn't match Pod's node affinity", later ones "...affinity/selector".
    assert "Unschedulable" in text and "node(s) didn't match" in text, text


async def test_container_that_cannot_run_fails_with_its_reason(k8s_cluster: str, kernelspec_dir: Any) -> None:
    text = await _start_failure(kernelspec_dir, python="/nonexistent/python3")
    assert "ContainerCannotRun" in text and "/nonexistent/python3" in text, text


async def test_pod_is_locked_down(k8s_cluster: str) -> None:
    km, kc = await start("sandbox-k8s", timeout=90)
    try:
        (name,) = _pods(km.kernel_id)
        pod = _core().read_namespaced_pod(name, NAMESPACE)
        spec, container = pod.spec, pod.spec.containers[0]
        assert spec.security_context.run_as_non_root and spec.security_context.run_as_user == 1000
        assert spec.security_context.seccomp_profile.type == "RuntimeDefault"
        assert spec.automount_service_account_token is False
        assert container.security_context.allow_privilege_escalation is False
        assert container.security_context.capabilities.drop == ["ALL"]
        assert container.image_pull_policy == "Never"
        assert pod.metadata.labels["sandbox-kernels/runtime"] == "k8s"
        out = await run_cell(kc, (
            "import os\n"
            "caps = [l.split()[1] for l in open('/proc/self/status') if l.startswith(('CapEff', 'NoNewPrivs', 'Seccomp:'))]\n"
            "print(os.getuid(), caps, os.path.exists('/var/run/secrets/kubernetes.io'))"
        ))
        assert out["stdout"] == "1000 ['0000000000000000', '1', '2'] False\n", out
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)
    assert not _pods(km.kernel_id)


async def test_dropped_forward_streams_are_reestablished(k8s_cluster: str) -> None:
    km, kc = await start("sandbox-k8s", timeout=90)
    try:
        assert (await run_cell(kc, "x = 1; print(x)"))["stdout"] == "1\n"
        km.provisioner.kernel.forwarder.drop_connections()  # as if the API server dropped every stream
        await kc.wait_for_ready(timeout=60)
        out = await run_cell(kc, "print(x + 1)")
        assert out["stdout"] == "2\n", out
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)


async def test_api_server_restart_keeps_the_kernel(k8s_cluster: str) -> None:
    """A real drop of every stream: the API server dies and comes back; the kernel keeps its
    state and the local ports, and clients get through again over new streams."""
    km, kc = await start("sandbox-k8s", timeout=90)
    try:
        assert (await run_cell(kc, "y = 5; print(y)"))["stdout"] == "5\n"
        pid = subprocess.run(["bash", "-c", f"source {INFRA}/common.sh; pid_of kube-apiserver"],
                             capture_output=True, text=True, check=True).stdout.strip()
        subprocess.run(["kill", "-KILL", pid], check=True)
        assert await km.is_alive(), "an unreachable API server is not a dead kernel"
        up = subprocess.run(["bash", str(INFRA / "up.sh")], capture_output=True, text=True, timeout=300)
        assert up.returncode == 0, up.stderr[-3000:]
        await kc.wait_for_ready(timeout=60)
        out = await run_cell(kc, "print(y + 1)")
        assert out["stdout"] == "6\n", out
        assert await km.is_alive()
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)
    assert not _pods(km.kernel_id)


def test_killed_owner_pod_is_reaped(k8s_cluster: str) -> None:
    """SIGKILL the process that owns a kernel pod; `sandbox-kernels reap` finds and deletes it
    and its NetworkPolicy."""
    import sys

    from helpers.orphans import start_orphan

    kernel_id = start_orphan("sandbox-k8s")
    assert _pods(kernel_id)
    reap = [str(Path(sys.executable).parent / "sandbox-kernels"), "reap", "--min-age", "0"]
    dry = subprocess.run(reap, capture_output=True, text=True, check=True, timeout=120)
    assert f"would remove pod {NAMESPACE}/" in dry.stdout and _pods(kernel_id), dry.stdout
    real = subprocess.run([*reap, "--yes"], capture_output=True, text=True, check=True, timeout=120)
    assert f"removed pod {NAMESPACE}/" in real.stdout, real.stdout
    assert f"removed network policy {NAMESPACE}/" in real.stdout, real.stdout
    deadline = time.monotonic() + 60
    while _pods(kernel_id) and time.monotonic() < deadline:
        time.sleep(1)
    assert not _pods(kernel_id) and not network_policies(kernel_id)
    assert not (Path(os.environ["SANDBOX_KERNELS_STATE_DIR"]) / kernel_id).exists(), real.stdout


@pytest.mark.slow
async def test_start_stop_cycles_leave_nothing(k8s_cluster: str) -> None:
    """Load: repeated start/stop of kernel pods (``make soak``: 50); then no pod remains."""
    from helpers.cycles import cycles_leave_nothing

    await cycles_leave_nothing("sandbox-k8s", int(os.environ.get("SANDBOX_KERNELS_SOAK_K8S_CYCLES", 5)), 120)
    assert not _pods()


def test_exec_status_is_parsed_bounded() -> None:
    """The exec status comes from the pod's side of the stream: an exit code is a short
    number or a SandboxError, never an unbounded int() (issue 10, finding 7)."""
    from sandbox_kernels.errors import SandboxError
    from sandbox_kernels.runtimes.k8s.exec_stream import exit_code

    def status(code: str) -> bytes:
        return json.dumps({"status": "Failure", "message": "command terminated with non-zero exit code",
                           "details": {"causes": [{"reason": "ExitCode", "message": code}]}}).encode()

    assert exit_code(b"", "x") == -1
    assert exit_code(b'{"metadata": {}, "status": "Success"}', "x") == 0
    assert exit_code(status("3"), "x") == 3
    for bad in ("9" * 5000, "-1", "3\n", "\u0663", ""):
        with pytest.raises(SandboxError, match="exit code|exec failed"):
            exit_code(status(bad), "x")
    with pytest.raises(SandboxError, match="unreadable"):
        exit_code(b"[1, 2]", "x")


def test_setting_checks_match_whole_values() -> None:
    """A trailing newline (which ``re.match(...$)`` accepts) or an endless number is refused."""
    from sandbox_kernels.errors import SandboxConfigError
    from sandbox_kernels.runtimes.k8s import checks

    assert checks.DNS_LABEL.fullmatch("default") and not checks.DNS_LABEL.fullmatch("default\n")
    for resources in ({"limits": {"memory": "1Gi\n"}}, {"limits": {"cpu": "9" * 5000}}):
        with pytest.raises(SandboxConfigError, match="quantity"):
            checks.check_resources(resources)
    with pytest.raises(SandboxConfigError, match="node_selector"):
        checks.check_node_selector({"zone": "a\n"})
