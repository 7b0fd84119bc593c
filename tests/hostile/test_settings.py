"""A kernelspec tries every setting that would widen its sandbox: each start is refused.

The kernelspec is the attacker here (anyone with a Jupyter data directory can write one). For
every runtime and every setting tagged as widening, the test writes a kernelspec asking for a
wider value than the admin allows and starts it through jupyter_client, as a server would: the
start must fail with a SandboxConfigError naming the setting and where an admin sets it, before
anything is created.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from traitlets import Dict, List, Unicode
from traitlets.config import Config

from sandbox_kernels.errors import SandboxConfigError
from sandbox_kernels.policy import widening_settings
from sandbox_kernels.runtimes.registry import records

pytestmark = pytest.mark.hostile

REPO = Path(__file__).resolve().parents[2]

#: What an attacker would ask for, where a generic "different value" would not say much.
_ATTACKS: dict[str, Any] = {
    "network": "host",
    "libvirt_uri": "qemu+ext:///system?command=/bin/false",
    "ssh_key_path": "/etc/shadow",
    "kubeconfig": "/root/.kube/config",
    "namespace": "kube-system",
    "service_account": "cluster-admin",
    "node_selector": {"node-role.kubernetes.io/control-plane": ""},
    "tolerations": [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}],
    "runtime_class_name": "runc",  # out of the admin's gVisor/Kata RuntimeClass
    "pool_size": 8,  # sandboxes held ready at the admin's expense (the admin's is 0)
}


def _attack(cls: type, name: str, rule: Any) -> tuple[dict[str, Any], Any]:
    """(admin config, kernelspec value wider than it) for setting ``name``."""
    trait = cls.class_traits()[name]
    admin = trait.default_value
    if rule == "true":
        return {name: False}, True
    if rule == "false":
        return {name: True}, False
    if rule == "higher":
        return {name: admin}, _ATTACKS.get(name, admin + 100)
    if rule == "subset":
        return {name: ["JPY_SESSION_NAME"]}, ["JPY_SESSION_NAME", "HOME", "/"]
    if isinstance(rule, tuple):
        return {name: rule[0]}, rule[-1]
    if name in _ATTACKS:
        return {}, _ATTACKS[name]
    if isinstance(trait, Unicode):
        return {}, "/"
    if isinstance(trait, Dict):
        return {}, {"widened": "yes"}
    if isinstance(trait, List):
        return {}, [{"widened": "yes"}]
    raise AssertionError(f"no attack value for {cls.__name__}.{name} ({rule!r}): add one")


CASES = [
    pytest.param(runtime, name, rule, id=f"{runtime.kernel_name}-{name}")
    for runtime in records()
    for name, rule in widening_settings(runtime.load("provisioner")).items()
]


def test_every_runtime_has_widening_settings() -> None:
    names = {runtime.kernel_name for runtime, *_ in (c.values for c in CASES)}
    assert names == {r.kernel_name for r in records()}


@pytest.mark.parametrize("runtime, name, rule", CASES)
async def test_kernelspec_cannot_widen(runtime: Any, name: str, rule: Any, tmp_path: Path) -> None:
    cls = runtime.load("provisioner")
    admin, value = _attack(cls, name, rule)
    spec = json.loads((REPO / "kernelspecs" / runtime.kernel_name / "kernel.json").read_text())
    spec["metadata"]["kernel_provisioner"]["config"] = {name: value}
    kdir = tmp_path / "kernels" / "attacker"
    kdir.mkdir(parents=True)
    (kdir / "kernel.json").write_text(json.dumps(spec))
    km = AsyncKernelManager(kernel_name="attacker",
                            kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kdir.parent)]),
                            config=Config({cls.__name__: admin}))
    with pytest.raises(SandboxConfigError) as info:
        await km.start_kernel()
    message = str(info.value)
    assert f"kernelspec setting {name}=" in message, message
    assert f"c.{cls.__name__}.{name}" in message, message
    assert not km.has_kernel
