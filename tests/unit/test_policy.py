"""The kernelspec policy's rules on a small traits class: no engine, no sandbox."""

from __future__ import annotations

import pytest
from traitlets import Bool, Enum, Int, List, Unicode
from traitlets.config import Config

from sandbox_kernels.errors import SandboxConfigError
from sandbox_kernels.policy import apply_kernelspec_config, widening_settings
from sandbox_kernels.provisioning.base import SandboxProvisioner


class Toy(SandboxProvisioner):
    """A provisioner with one setting per rule (the lifecycle hooks are never called)."""

    runtime = "toy"
    uri = Unicode("safe://", config=True, help="Env: TOY_URI.").tag(widen="admin")
    network = Unicode("none", config=True).tag(widen="admin", narrowest="none")
    allow = Bool(False, config=True).tag(widen="true")
    read_only = Bool(True, config=True).tag(widen="false")
    slots = Int(2, config=True).tag(widen="higher")
    dirs = List(Unicode(), ["/a", "/b"], config=True).tag(widen="subset")
    transport = Enum(["ipc", "tcp"], "ipc", config=True).tag(widen=("ipc", "tcp"))
    memory = Int(512, config=True)

    async def create_sandbox(self) -> None: ...
    async def start_kernel(self, cmd, env) -> None: ...  # type: ignore[no-untyped-def]
    async def kernel_exit_code(self) -> int | None: ...
    async def signal_kernel(self, signum: int) -> None: ...
    async def destroy_sandbox(self) -> None: ...


def toy(admin: dict | None = None, **spec) -> Toy:  # type: ignore[type-arg,no-untyped-def]
    config = Config({"Toy": admin or {}})
    return Toy(kernel_id="k1", kernel_spec=None, config=config, **spec)


@pytest.mark.parametrize("spec", [
    {"uri": "qemu+ext:///system?command=/bin/evil"},
    {"network": "host"},
    {"allow": True},
    {"read_only": False},
    {"slots": 3},
    {"dirs": ["/a", "/"]},
    {"transport": "tcp"},
])
def test_a_kernelspec_cannot_widen(spec: dict) -> None:  # type: ignore[type-arg]
    (name,) = spec
    with pytest.raises(SandboxConfigError, match=f"kernelspec setting {name}=.*c.Toy.{name}"):
        toy(**spec)


@pytest.mark.parametrize("spec", [
    {"uri": "safe://"},
    {"network": "none"},
    {"allow": False},
    {"read_only": True},
    {"slots": 1},
    {"dirs": ["/b"]},
    {"transport": "ipc"},
    {"memory": 4096},
])
def test_a_kernelspec_may_narrow_or_repeat(spec: dict) -> None:  # type: ignore[type-arg]
    (name, value), = spec.items()
    assert getattr(toy(**spec), name) == value


@pytest.mark.parametrize("admin, spec", [
    ({"uri": "other://"}, {"uri": "other://"}),
    ({"network": "bridge"}, {"network": "bridge"}),
    ({"network": "bridge"}, {"network": "none"}),
    ({"allow": True}, {"allow": True}),
    ({"read_only": False}, {"read_only": False}),
    ({"slots": 8}, {"slots": 5}),
    ({"transport": "tcp"}, {"transport": "tcp"}),
])
def test_what_the_admin_allows_a_kernelspec_may_use(admin: dict, spec: dict) -> None:  # type: ignore[type-arg]
    (name, value), = spec.items()
    assert getattr(toy(admin, **spec), name) == value


def test_the_admins_environment_counts_as_admin(monkeypatch: pytest.MonkeyPatch) -> None:
    from sandbox_kernels.runtimes.vm.provisioner import LibvirtProvisioner

    monkeypatch.setenv("NIXOS_SANDBOX_ENABLED", "false")
    with pytest.raises(SandboxConfigError, match="NIXOS_SANDBOX_ENABLED"):
        LibvirtProvisioner(kernel_id="k1", kernel_spec=None, enabled=True)
    monkeypatch.setenv("NIXOS_MAX_CONCURRENT_VMS", "6")
    assert LibvirtProvisioner(kernel_id="k1", kernel_spec=None, max_concurrent_vms=4).max_concurrent_vms == 4


def test_an_invalid_value_names_the_setting() -> None:
    with pytest.raises(SandboxConfigError, match="'slots'"):
        toy(slots="many")
    with pytest.raises(SandboxConfigError, match="'colour'"):
        toy(colour="blue")


def test_widening_settings_lists_the_tags() -> None:
    assert widening_settings(Toy)["slots"] == "higher"
    assert "memory" not in widening_settings(Toy)
