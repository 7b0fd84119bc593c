"""sandbox-k8s's ``runtime_class_name``: the pod manifest's ``runtimeClassName``, validated as a
RuntimeClass name, and chosen by the admin only.

The test cluster runs dockershim, which cannot run RuntimeClass handlers (a pod naming one
stays unscheduled), so the field is tested here, on the manifest, not on a live pod.
"""

from __future__ import annotations

from typing import Any

import pytest
from traitlets.config import Config

from sandbox_kernels.errors import SandboxConfigError
from sandbox_kernels.policy import apply_kernelspec_config
from sandbox_kernels.runtimes.k8s.manifest import pod_manifest
from sandbox_kernels.runtimes.k8s.provisioner import KubernetesProvisioner


def _pod(**extra: Any) -> dict[str, Any]:
    return pod_manifest(name="p", labels={}, image="i", image_pull_policy="Never", python="python3",
                        resources={}, node_selector={}, tolerations=[], service_account="",
                        automount_token=False, seccomp=True, **extra)


def test_manifest_carries_the_runtime_class_only_when_set() -> None:
    assert "runtimeClassName" not in _pod()["spec"]
    assert "runtimeClassName" not in _pod(runtime_class_name="")["spec"]
    assert _pod(runtime_class_name="gvisor")["spec"]["runtimeClassName"] == "gvisor"


def test_setting_reads_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    assert KubernetesProvisioner().runtime_class_name == ""
    monkeypatch.setenv("SANDBOX_K8S_RUNTIME_CLASS_NAME", "kata-qemu")
    assert KubernetesProvisioner().runtime_class_name == "kata-qemu"


@pytest.mark.parametrize("bad", ["gVisor", "-gvisor", "gvisor-", "run c", "a/b", "x" * 254, "rc;rm"])
def test_names_that_are_not_runtime_classes_are_refused(bad: str) -> None:
    with pytest.raises(SandboxConfigError, match="runtime_class_name"):
        KubernetesProvisioner(runtime_class_name=bad)


@pytest.mark.parametrize("admin, asked, allowed", [
    ("gvisor", "gvisor", True),   # repeating the admin's value
    ("gvisor", "runc", False),    # another class may be weaker isolation
    ("gvisor", "", False),        # the cluster default may be runc
    ("", "gvisor", False),        # even a stronger-looking one: only the admin knows the cluster
])
def test_a_kernelspec_may_only_keep_the_admins_class(admin: str, asked: str, allowed: bool) -> None:
    prov = KubernetesProvisioner(config=Config({"KubernetesProvisioner": {"runtime_class_name": admin}}))
    if allowed:
        apply_kernelspec_config(prov, {"runtime_class_name": asked})
        assert prov.runtime_class_name == asked
    else:
        with pytest.raises(SandboxConfigError, match="c.KubernetesProvisioner.runtime_class_name"):
            apply_kernelspec_config(prov, {"runtime_class_name": asked})
