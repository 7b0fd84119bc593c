"""The VM provisioner's settings and re-attach, without libvirt (nothing is started)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from traitlets.config import Config

from sandbox_kernels.errors import SandboxConfigError
from sandbox_kernels.runtimes.vm import image_policy
from sandbox_kernels.runtimes.vm.provisioner import LibvirtProvisioner


def test_image_dirs_default_is_read_by_the_trait_not_the_policy(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    monkeypatch.delenv(image_policy.ENV, raising=False)
    monkeypatch.setenv("NIXOS_SANDBOX_BASE_IMAGE", str(tmp_path / "imgs" / "guest.qcow2"))
    dirs = LibvirtProvisioner(kernel_id="k").image_dirs
    assert str(tmp_path / "imgs") in dirs and image_policy.SYSTEM_IMAGE_DIR in dirs
    monkeypatch.setenv(image_policy.ENV, os.pathsep.join([str(tmp_path / "a"), "", str(tmp_path / "b")]))
    assert LibvirtProvisioner(kernel_id="k").image_dirs == [str(tmp_path / "a"), str(tmp_path / "b")]
    # The policy itself reads no environment: what it is given, or the built-in defaults.
    monkeypatch.setenv(image_policy.ENV, "/elsewhere")
    assert image_policy.allowed_dirs([str(tmp_path / "a")]) == [Path(os.path.realpath(tmp_path / "a"))]
    assert Path("/elsewhere") not in image_policy.allowed_dirs([])
    with pytest.raises(SandboxConfigError, match="outside the allowed VM image directories"):
        image_policy.check_path("/etc/passwd", "base_image", image_policy.allowed_dirs([str(tmp_path)]))


@pytest.mark.parametrize("name, value", [("memory_mb", 127), ("memory_mb", 256 * 1024 + 1),
                                         ("vcpus", 0), ("vcpus", 65),
                                         ("extra_cmdline", ["quiet", "init=/bin/sh;reboot"])])
def test_settings_out_of_bounds_are_refused_at_the_trait(name: str, value: object) -> None:
    with pytest.raises(SandboxConfigError, match=name.split("_")[0] if name != "extra_cmdline" else "command line"):
        LibvirtProvisioner(kernel_id="k", **{name: value})


def test_a_reattached_provisioner_finds_its_machine_from_the_saved_state(tmp_path: Path) -> None:
    admin = Config({"LibvirtProvisioner": {"images_dir": str(tmp_path), "allow_network": True}})
    prov = LibvirtProvisioner(kernel_id="k1", config=admin)
    prov.load_runtime_state({"pid": 7, "remote_ports": {}, "ssh_port": 40022,
                             "keys": {"client": "/state/ssh/client", "host_public": "ssh-ed25519 AAAA"}})
    machine = prov.machine_now()
    assert machine.name == "sandbox-kernels-k1" and machine.ssh_port == 40022
    assert machine.console == tmp_path / "k1" / "console.log" == prov.console_path
    assert machine.spec.reseed_socket == str(tmp_path / "k1" / "reseed.sock")
    assert machine.spec.outbound_socket == str(tmp_path / "k1" / "outbound.sock")
    assert machine.keys.host_public == "ssh-ed25519 AAAA" and machine.keys.client_path == "/state/ssh/client"
    assert prov.machine_now() is machine
