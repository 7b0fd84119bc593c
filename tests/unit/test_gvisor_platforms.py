"""The gVisor runtime's pure parts: platform choice and fallback, the engine registration it
writes into daemon.json, and the container spec it hands to Docker (no engine needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sandbox_kernels.errors import SandboxConfigError, SandboxUnavailable
from sandbox_kernels.runtimes.gvisor import engine_config
from sandbox_kernels.runtimes.gvisor.platforms import (choose_platform, kvm_problem,
                                                       registered_platforms)
from sandbox_kernels.runtimes.gvisor.provisioner import GVisorProvisioner


def test_registered_platforms_are_read_from_the_engines_runtimes() -> None:
    runtimes = {"runc": {}, "runsc-ptrace": {}, "runsc-kvm": {}, "runsc-bogus": {}, "runsc": {}}
    assert registered_platforms(runtimes) == ["ptrace", "kvm"]


def test_auto_takes_the_first_usable_platform() -> None:
    assert choose_platform("auto", ["ptrace", "kvm"], kvm="").platform == "kvm"
    choice = choose_platform("auto", ["ptrace", "kvm"], kvm="the host runs paravirtual KVM")
    assert (choice.platform, choice.runtime, choice.fallback) == ("ptrace", "runsc-ptrace", False)


def test_an_explicit_platform_that_works_is_kept() -> None:
    choice = choose_platform("ptrace", ["ptrace", "kvm"], kvm="")
    assert (choice.platform, choice.fallback) == ("ptrace", False)


@pytest.mark.parametrize("registered, kvm, why", [
    (["ptrace"], "", "no Docker runtime runsc-kvm"),
    (["ptrace", "kvm"], "the host runs paravirtual KVM (kvm_pvm)", "kvm_pvm"),
])
def test_an_unusable_platform_falls_back_loudly_naming_the_setting(registered: list[str], kvm: str,
                                                                   why: str) -> None:
    choice = choose_platform("kvm", registered, kvm=kvm)
    assert (choice.platform, choice.fallback) == ("ptrace", True)
    assert "SANDBOX_GVISOR_PLATFORM" in choice.reason and "c.GVisorProvisioner.platform" in choice.reason
    assert why in choice.reason


def test_nothing_registered_is_an_actionable_error() -> None:
    with pytest.raises(SandboxUnavailable, match="setup.sh"):
        choose_platform("auto", [], kvm="")


def test_kvm_problem(tmp_path: Path) -> None:
    kvm, pvm = tmp_path / "kvm", tmp_path / "kvm_pvm"
    assert "does not exist" in kvm_problem(kvm, pvm)
    kvm.touch()
    assert kvm_problem(kvm, pvm) == ""
    pvm.mkdir()
    assert "paravirtual" in kvm_problem(kvm, pvm)


def test_merge_keeps_other_settings_and_drops_platforms_that_stopped_working() -> None:
    current = {"log-level": "warn", "runtimes": {"other": {"path": "/x"},
                                                 "runsc-kvm": {"path": "/usr/bin/runsc"}}}
    merged = engine_config.merge_runtimes(current, "/usr/bin/runsc", ["ptrace"], ["ptrace", "kvm"])
    assert merged["log-level"] == "warn"
    assert set(merged["runtimes"]) == {"other", "runsc-ptrace"}
    args = merged["runtimes"]["runsc-ptrace"]["runtimeArgs"]
    assert args == ["--platform=ptrace", "--host-uds=create", "--network=none"]
    assert current["runtimes"].keys() == {"other", "runsc-kvm"}, "the input is not modified"
    # none works: an empty map (dockerd's reload drops runtimes only when the key is present)
    assert engine_config.merge_runtimes(merged, "/usr/bin/runsc", [], ["ptrace"])["runtimes"] == {"other": {"path": "/x"}}
    assert engine_config.merge_runtimes({"runtimes": {"runsc-ptrace": {}}}, "r", [], ["ptrace"]) == {"runtimes": {}}
    assert engine_config.merge_runtimes({}, "r", [], ["ptrace"]) == {}


def test_host_uds_lets_the_sandbox_create_sockets_only() -> None:
    """``create``: the kernel binds its ipc sockets; ``open``/``all`` would let it reach the
    host's sockets on a mount."""
    assert "--host-uds=create" in engine_config.RUNSC_ARGS
    assert not any(a in engine_config.RUNSC_ARGS for a in ("--host-uds=all", "--host-uds=open"))


def test_verdicts_are_cached_per_runsc_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    probes: list[str] = []
    monkeypatch.setattr(engine_config, "_version", lambda runsc: "runsc version 1")
    monkeypatch.setattr(engine_config, "known_platforms", lambda runsc: ["kvm", "ptrace"])
    monkeypatch.setattr(engine_config, "probe",
                        lambda runsc, name: probes.append(name) or ("hangs" if name == "kvm" else ""))
    cache = tmp_path / "platforms.json"
    assert engine_config.verdicts("runsc", cache) == {"kvm": "hangs", "ptrace": ""}
    assert engine_config.verdicts("runsc", cache) == {"kvm": "hangs", "ptrace": ""}
    assert probes == ["kvm", "ptrace"], "the second call reads the cache"
    monkeypatch.setattr(engine_config, "_version", lambda runsc: "runsc version 2")
    engine_config.verdicts("runsc", cache)
    assert probes == ["kvm", "ptrace"] * 2, "a new runsc is probed again"


def test_platform_setting_reads_its_variable_and_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOX_GVISOR_PLATFORM", "ptrace")
    assert GVisorProvisioner().platform == "ptrace"
    monkeypatch.setenv("SANDBOX_GVISOR_PLATFORM", "vmware")
    with pytest.raises(SandboxConfigError, match="SANDBOX_GVISOR_PLATFORM"):
        GVisorProvisioner().platform


def test_network_stays_none_whatever_dockers_admin_set(monkeypatch: pytest.MonkeyPatch) -> None:
    from traitlets.config import Config

    monkeypatch.setenv("SANDBOX_DOCKER_NETWORK", "bridge")
    prov = GVisorProvisioner(config=Config({"DockerProvisioner": {"memory": "2g"}}))
    assert prov.network == "none" and prov.memory == "2g", "Docker's limits apply, its network does not"
    with pytest.raises(SandboxConfigError, match="no network"):
        prov.network = "bridge"


def test_container_spec_is_dockers_with_the_runsc_runtime(tmp_path: Path) -> None:
    from sandbox_kernels.runtimes.docker.provisioner import DockerProvisioner

    def spec(cls: Any, **state: Any) -> dict[str, Any]:
        prov = cls(kernel_id="0123456789abcdef")
        prov.load_runtime_state(state)
        prov.connection_info = {"ip": str(tmp_path / "k")}
        return prov._container_spec(["python3"], {})  # the spec Docker gets, as start_kernel builds it

    docker = spec(DockerProvisioner)
    gvisor = spec(GVisorProvisioner, gvisor_platform="ptrace", gvisor_runtime="runsc-ptrace")
    assert "runtime" not in docker
    assert gvisor.pop("runtime") == "runsc-ptrace"
    for key in ("name", "hostname", "labels", "volumes", "command"):
        docker.pop(key), gvisor.pop(key)
    assert gvisor == docker, "everything else (limits, user, caps, network) is the Docker runtime's"


def test_the_platform_survives_a_reattach() -> None:
    from sandbox_kernels.runtimes.gvisor.platforms import PlatformChoice

    prov = GVisorProvisioner()
    prov.platform_choice = PlatformChoice("ptrace", "runsc-ptrace", "as set")
    again = GVisorProvisioner()
    again.load_runtime_state(prov.runtime_state())
    assert again.container_runtime() == "runsc-ptrace"
    assert GVisorProvisioner().snapshot_capabilities().kinds == ["filesystem"]


class _FakeClient:
    def __init__(self, runtimes: dict[str, Any], experimental: bool = False) -> None:
        self._info = {"Runtimes": runtimes, "ExperimentalBuild": experimental}

    def info(self) -> dict[str, Any]:
        return self._info


class _FakeEngine:
    """The DockerEngine methods the gVisor doctor uses; ``release`` is what ``uname -r`` prints."""

    created: list[dict[str, Any]] = []
    removed: list[str] = []

    def __init__(self, runtimes: dict[str, Any], release: str) -> None:
        self.client = _FakeClient(runtimes)
        self.release = release

    def create(self, **spec: Any) -> str:
        self.created.append(spec)
        return "cid"

    def start(self, cid: str) -> None:
        pass

    def wait_stopped(self, cid: str, timeout: float) -> None:
        pass

    def state(self, cid: str) -> dict[str, Any]:
        return {"ExitCode": 0}

    def logs(self, cid: str, tail: int = 30) -> str:
        return self.release + "\n"

    def remove(self, ref: str) -> None:
        self.removed.append(ref)

    def close(self) -> None:
        pass


@pytest.mark.parametrize("runtimes, release, ok, says", [
    ({"runc": {}}, "4.4.0", False, "not registered"),
    ({"runc": {}, "runsc-ptrace": {}}, "4.4.0", True, "runsc works here: a container on runsc-ptrace"),
    ({"runc": {}, "runsc-ptrace": {}}, "6.1.0-13-amd64", False, "did not run under gVisor"),
])
def test_doctor(monkeypatch: pytest.MonkeyPatch, runtimes: dict[str, Any], release: str, ok: bool,
                says: str) -> None:
    from sandbox_kernels.doctor import RuntimeReport
    from sandbox_kernels.runtimes.gvisor import doctor

    engine = _FakeEngine(runtimes, release)
    _FakeEngine.created, _FakeEngine.removed = [], []
    monkeypatch.setattr(doctor, "docker_check", lambda report, settings: None)
    monkeypatch.setattr(doctor, "DockerEngine", lambda timeout: engine)
    report = RuntimeReport("gvisor", "sandbox-gvisor", ok=True)
    doctor.check(report, GVisorProvisioner(platform="ptrace"))
    assert report.ok is ok, report
    assert any(says in d for d in report.details), report.details
    if _FakeEngine.created:  # the probe container: gVisor's runtime, no network, removed again
        spec = _FakeEngine.created[0]
        assert spec["runtime"] == "runsc-ptrace" and spec["network_mode"] == "none"
        assert _FakeEngine.removed == ["cid"]
        assert any(d.startswith("memory snapshots: unavailable") for d in report.details)
