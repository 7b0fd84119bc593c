"""What the VM domain and the kernel pod ask their engines for, checked without an engine.

The engine suites prove the real parts honour these; here, in a second, that the specs say
what the security model promises: slirp restricted to an SSH forward on 127.0.0.1, the
outbound NIC only with allow_network, hostile values refused; a non-root pod with no
capabilities, no token, a storage limit and a deny-all NetworkPolicy.
"""

from __future__ import annotations

import dataclasses

import pytest

from sandbox_kernels.errors import SandboxConfigError
from sandbox_kernels.runtimes.k8s.manifest import network_policy_manifest, pod_manifest
from sandbox_kernels.runtimes.vm.domain_xml import DomainSpec

KERNEL_ID = "5f1c7a4e-0000-4000-8000-000000000001"
SPEC = DomainSpec(kernel_id=KERNEL_ID, domain_type="qemu", memory_mib=512, vcpus=1,
                  kernel="/images/vmlinuz", initrd=None, root="/state/root.qcow2",
                  seed="/state/seed.img", serial_log="/state/console.log", ssh_port=50000)


def test_slirp_is_restricted_to_an_ssh_forward_on_loopback() -> None:
    args = SPEC.netdev_args()
    assert args[1] == "user,id=sk0,restrict=on,ipv6=off,hostfwd=tcp:127.0.0.1:50000-:22"
    assert not any("stream" in a for a in args), "no outbound NIC without allow_network"
    xml = SPEC.to_xml()
    assert "restrict=on" in xml and "0.0.0.0" not in xml


def test_allow_network_adds_only_the_outbound_nic() -> None:
    spec = dataclasses.replace(SPEC, allow_network=True, outbound_socket="/state/outbound.sock")
    args = spec.netdev_args()
    assert args[1].startswith("user,id=sk0,restrict=on,")  # SSH path unchanged
    assert "stream,id=sk1,server=off,addr.type=unix,addr.path=/state/outbound.sock" in args


@pytest.mark.parametrize("change, word", [
    ({"allow_network": True, "outbound_socket": "/state/a,b.sock"}, "outbound socket"),
    ({"allow_network": True, "outbound_socket": None}, "outbound socket"),
    ({"ssh_port": 22}, "ssh_port"),
    ({"extra_cmdline": ("init=/bin/sh; reboot",)}, "command line"),
    ({"extra_cmdline": ("quiet\n",)}, "command line"),
    ({"kernel_id": "x\n"}, "kernel id"),
    ({"memory_mib": 1 << 30}, "memory"),
    ({"memory_mib": 64}, "memory_mb=64 is out of range: use 128 to 262144"),
    ({"vcpus": 0}, "vcpus=0 is out of range: use 1 to 64"),
    ({"vcpus": 65}, "vcpus=65 is out of range"),
    ({"vcpus": True}, "vcpus=True is out of range"),
    ({"vcpus": 2.0}, "vcpus=2.0 is out of range"),
])
def test_hostile_values_are_refused(change: dict, word: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(SandboxConfigError, match=word):
        dataclasses.replace(SPEC, **change).to_xml()


def _pod(**overrides: object) -> dict:  # type: ignore[type-arg]
    args = dict(name="sandbox-kernels-k1", labels={"sandbox-kernels/kernel-id": "k1"}, image="img",
                image_pull_policy="Never", python="python3", resources={"limits": {"memory": "1Gi"}},
                node_selector={}, tolerations=[], service_account="", automount_token=False,
                seccomp=True, ephemeral_storage="2Gi")
    args.update(overrides)
    return pod_manifest(**args)  # type: ignore[arg-type]


def test_pod_runs_locked_down() -> None:
    spec = _pod()["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 1000
    assert spec["automountServiceAccountToken"] is False and "serviceAccountName" not in spec
    (container,) = spec["containers"]
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "privileged": False,
                                            "capabilities": {"drop": ["ALL"]}}
    assert container["resources"]["limits"] == {"memory": "1Gi", "ephemeral-storage": "2Gi"}
    assert "ports" not in container and "hostNetwork" not in spec and "hostPID" not in spec


def test_a_kernelspec_storage_limit_wins_over_the_default() -> None:
    limits = _pod(resources={"limits": {"ephemeral-storage": "50Mi"}})["spec"]["containers"][0]["resources"]["limits"]
    assert limits == {"ephemeral-storage": "50Mi"}


def test_network_policy_denies_everything_for_the_kernels_pod() -> None:
    labels = {"sandbox-kernels/kernel-id": "k1", "sandbox-kernels/runtime": "k8s"}
    policy = network_policy_manifest(name="sandbox-kernels-k1", labels=labels,
                                     kernel_label="sandbox-kernels/kernel-id")
    assert policy["spec"] == {"podSelector": {"matchLabels": {"sandbox-kernels/kernel-id": "k1"}},
                              "policyTypes": ["Ingress", "Egress"], "ingress": [], "egress": []}
    assert policy["metadata"]["labels"] == labels


def test_refreshing_the_seed_keeps_everything_but_the_random_bytes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from sandbox_kernels.ssh.keys import generate_keypair
    from sandbox_kernels.runtimes.vm.seed import read_seed, refresh_random_seed, write_seed_disk

    host = generate_keypair("host")
    path = write_seed_disk(tmp_path / "seed.img", host.private_openssh, "ssh-ed25519 AAAA test\n",
                           "sandbox-1", True, b"\1" * 32, True)
    before = read_seed(path)
    inode = path.stat().st_ino
    refresh_random_seed(path, b"\2" * 32)
    after = read_seed(path)
    assert after.pop("random_seed") == b"\2" * 32 and before.pop("random_seed") == b"\1" * 32
    assert after == before and path.stat().st_ino == inode  # QEMU keeps the same file open


def test_a_bad_seed_value_leaves_the_seed_disk_untouched(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from sandbox_kernels.ssh.keys import generate_keypair
    from sandbox_kernels.runtimes.vm.seed import write_seed_disk

    host = generate_keypair("host")
    path = write_seed_disk(tmp_path / "seed.img", host.private_openssh, "ssh-ed25519 AAAA test\n", "sandbox-1")
    disk = path.read_bytes()
    assert len(disk) == 64 * 1024 and path.stat().st_mode & 0o777 == 0o600
    for bad in ({"random_seed": b"short"}, {"hostname": "-bad"}, {"authorized_keys": "k" * 70000}):
        args = {"host_key_openssh": host.private_openssh, "authorized_keys": "ssh-ed25519 AAAA test\n",
                "hostname": "sandbox-1", **bad}
        with pytest.raises(SandboxConfigError):
            write_seed_disk(path, **args)
        assert path.read_bytes() == disk  # checked before the file is opened (and truncated)
