"""The runtime registry with fake entry points: lookup, lazy imports, missing dependencies, and
doctor, reap, the CLI and the leak check iterating whatever records the entry points give."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any, Iterator

import pytest
from traitlets.config import Config

from sandbox_kernels import doctor, reap
from sandbox_kernels.cli import build_parser, main
from sandbox_kernels.errors import SandboxUnavailable
from sandbox_kernels.runtimes import registry

FAKE = textwrap.dedent('''
    from pathlib import Path

    from traitlets import Unicode

    from sandbox_kernels.provisioning.base import SandboxProvisioner
    from sandbox_kernels.reap import Orphan, OrphanFinder
    from sandbox_kernels.runtimes.registry import RuntimeRecord
    from sandbox_kernels.settings import env_default

    REMOVED = []


    class FakeProvisioner(SandboxProvisioner):
        runtime = "fake"
        kernel_name = "sandbox-fake"
        place = Unicode("here", config=True, help="Where. Env: FAKE_PLACE.")
        _place_default = env_default("place", "FAKE_PLACE")

        async def create_sandbox(self): ...
        async def start_kernel(self, cmd, env): ...
        async def kernel_exit_code(self): ...
        async def signal_kernel(self, signum): ...
        async def destroy_sandbox(self): ...


    def check(report, settings):
        report.details.append(f"place {settings.place}")


    class FakeOrphans(OrphanFinder):
        def orphans(self):
            place = self.settings.place
            return [Orphan("gizmo", place, lambda: REMOVED.append(place), "k-gone")]

        def existing(self):
            return {"k-running"}

        def leaks(self, session):
            return {"gizmos": [session]}

        def remove_leaks(self, leaks):
            REMOVED.extend(leaks.get("gizmos", []))


    RECORD = RuntimeRecord(
        name="fake", alias="toy", kernel_name="sandbox-fake", display_name="Python (Fake)",
        provisioner="fake_runtime:FakeProvisioner", extra="fake", doctor="fake_runtime:check",
        orphans="fake_runtime:FakeOrphans", reap_options={"place": "where the gizmos are"})
    NEEDY = RuntimeRecord(
        name="needy", kernel_name="sandbox-needy", display_name="Python (Needy)",
        provisioner="fake_needs_dep:Provisioner", extra="needy", doctor="fake_runtime:check",
        orphans="fake_runtime:FakeOrphans")
    NOT_A_RECORD = "a string"
''')

GROUP = registry.ENTRY_POINT_GROUP


@pytest.fixture
def fakes(tmp_path: Path) -> Iterator[object]:
    """The entry points name only the fake runtimes (and two broken entries)."""
    (tmp_path / "fake_runtime.py").write_text(FAKE)
    (tmp_path / "fake_needs_dep.py").write_text("import absent_dependency_of_a_runtime\n")
    eps = [EntryPoint("fake", "fake_runtime:RECORD", GROUP),
           EntryPoint("needy", "fake_runtime:NEEDY", GROUP),
           EntryPoint("gone", "fake_runtime_that_is_not_there:RECORD", GROUP),
           EntryPoint("liar", "fake_runtime:NOT_A_RECORD", GROUP)]
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(tmp_path))
        mp.setattr(registry, "entry_points", lambda group: [e for e in eps if e.group == group])
        mp.setenv("SANDBOX_KERNELS_STATE_DIR", str(tmp_path / "state"))
        mp.delenv("FAKE_PLACE", raising=False)
        registry.refresh()
        import fake_runtime

        fake_runtime.REMOVED.clear()
        yield fake_runtime
    sys.modules.pop("fake_runtime", None)
    registry.refresh()


def test_records_come_from_the_entry_points(fakes: object, caplog: pytest.LogCaptureFixture) -> None:
    registry.refresh()
    assert [r.name for r in registry.records()] == ["fake", "needy"]
    assert "gone" in caplog.text and "liar" in caplog.text  # skipped, loudly


def test_lookup_by_name_and_alias(fakes: object) -> None:
    assert registry.get("fake") is registry.get("toy")
    assert registry.load("toy").__name__ == "FakeProvisioner"
    with pytest.raises(SandboxUnavailable, match=r"unknown runtime 'podman'; known: fake, needy"):
        registry.get("podman")


def test_register_refuses_a_second_record_of_a_name(fakes: object) -> None:
    other = registry.RuntimeRecord("fake", "x", "X", "m:C", "e", "m:f", "m:O")
    with pytest.raises(ValueError, match="already registered"):
        registry.register(other)
    registry.register(other, clobber=True)
    assert registry.get("fake") is other


def test_a_record_states_only_what_is_its_own() -> None:
    record = registry.RuntimeRecord(package="plugins.toy", display_name="Python (Toy)",
                                    provisioner=".provisioner:ToyProvisioner", orphans=".orphans:ToyOrphans",
                                    image="shared.images:build", commands=".cli:add_parser")
    assert (record.name, record.kernel_name, record.extra) == ("toy", "sandbox-toy", "toy")
    assert record.provisioner == "plugins.toy.provisioner:ToyProvisioner"
    assert record.doctor == "plugins.toy.doctor:check"
    assert record.orphans == "plugins.toy.orphans:ToyOrphans"
    assert (record.image, record.commands) == ("shared.images:build", "plugins.toy.cli:add_parser")
    variant = record.variant(package="plugins.toy_jail", display_name="Python (Jailed toy)",
                             provisioner=".provisioner:JailProvisioner", options={"memory": "memory"})
    assert (variant.name, variant.kernel_name, variant.extra) == ("toy_jail", "sandbox-toy_jail", "toy")
    assert variant.orphans == record.orphans  # kept: the same sandboxes to find
    assert (variant.doctor, variant.image) == ("plugins.toy_jail.doctor:check", "")  # its own
    assert variant.options == {"memory": "memory"}


def test_a_record_refuses_missing_parts_and_relative_parts_without_a_package() -> None:
    with pytest.raises(ValueError, match="has no display_name, orphans"):
        registry.RuntimeRecord("toy", provisioner="m:C")
    with pytest.raises(ValueError, match="relative: give the record a package"):
        registry.RuntimeRecord("toy", display_name="T", provisioner="m:C", orphans="m:O")  # doctor's default
    with pytest.raises(ValueError, match="has no name"):
        registry.RuntimeRecord(display_name="T", provisioner="m:C", doctor="m:f", orphans="m:O")


def test_a_missing_dependency_names_the_pip_extra(fakes: object) -> None:
    with pytest.raises(SandboxUnavailable, match=r"absent_dependency_of_a_runtime.*sandbox-kernels\[needy\]"):
        registry.get("needy").load("provisioner")
    with pytest.raises(SandboxUnavailable, match=r"'kubernetes'.*sandbox-kernels\[kubernetes\]"):
        _raise_missing("kubernetes")


def _raise_missing(package: str) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, package, None)  # import of it fails as if not installed
        registry.require(package)


def test_a_broken_module_of_ours_is_not_reported_as_a_missing_package(fakes: object) -> None:
    with pytest.raises(ImportError):
        registry.require("sandbox_kernels.no_such_module")


def test_doctor_iterates_the_records(fakes: object) -> None:
    reports = {r.runtime: r for r in doctor.check_all()}
    assert reports["fake"].ok and reports["fake"].details == ["place here"]
    assert not reports["needy"].ok
    assert "sandbox-kernels[needy]" in reports["needy"].details[0]


def test_doctor_reads_the_settings_admin_config_over_environment(fakes: object,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_PLACE", "from-env")
    assert doctor.check("toy").details == ["place from-env"]
    admin = Config({"FakeProvisioner": {"place": "from-admin"}})
    assert doctor.check("fake", admin).details == ["place from-admin"]


def test_reap_iterates_the_records(fakes: object, tmp_path: Path) -> None:
    state = tmp_path / "state"
    for kernel in ("k-gone", "k-running", "k-young"):
        (state / kernel).mkdir(parents=True)
    old = 1_000_000_000
    os.utime(state / "k-running", (old, old))
    found = reap.find_orphans(min_age=3600, place="there")
    assert [(o.kind, o.name) for o in found] == [("gizmo", "there")]  # k-gone is young, k-running exists
    done = reap.reap(min_age=3600, place="there")
    assert done == ["removed gizmo there", f"removed state {state / 'k-gone'}"]  # freed by the reap
    assert fakes.REMOVED == ["there"]  # type: ignore[attr-defined]
    assert sorted(p.name for p in state.iterdir()) == ["k-running", "k-young"]


def test_reap_skips_runtimes_whose_dependencies_are_missing(fakes: object) -> None:
    assert [type(f).__name__ for f in reap.finders()] == ["FakeOrphans"]


def test_the_cli_offers_what_the_records_declare(fakes: object, capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    assert parser.parse_args(["doctor", "needy"]).runtime == "needy"
    assert parser.parse_args(["reap", "--place", "x"]).place == "x"
    with pytest.raises(SystemExit):
        parser.parse_args(["doctor", "docker"])  # only the records the entry points give
    assert main(["doctor", "fake", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["details"] == ["place here"]


def test_the_leak_check_iterates_the_records(fakes: object, monkeypatch: pytest.MonkeyPatch) -> None:
    from helpers.leaks import find_leaks, remove_leaks

    monkeypatch.setenv("SANDBOX_KERNELS_SESSION", "s1")
    leaks = find_leaks()
    assert leaks == {"state": [], "gizmos": ["s1"]}
    remove_leaks(leaks)
    assert fakes.REMOVED == ["s1"]  # type: ignore[attr-defined]


def test_importing_the_registry_and_the_cli_imports_no_runtime_dependency() -> None:
    code = ("import sys\n"
            "from sandbox_kernels.runtimes import registry\n"
            "from sandbox_kernels.cli import build_parser\n"
            "assert registry.records()\n"
            "build_parser()\n"
            "print(sorted(m for m in ('docker', 'libvirt', 'kubernetes', 'paramiko') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


def test_reap_goes_on_when_a_runtimes_settings_are_invalid(fakes: object, monkeypatch: pytest.MonkeyPatch,
                                                            tmp_path: Path) -> None:
    from sandbox_kernels.errors import SandboxConfigError

    def broken(self: object) -> list[object]:
        raise SandboxConfigError("environment variable FAKE_PLACE=... is not valid")

    (tmp_path / "state" / "k-gone").mkdir(parents=True)
    monkeypatch.setattr(fakes.FakeOrphans, "orphans", broken)  # type: ignore[attr-defined]
    assert reap.reap(min_age=0) == [f"removed state {tmp_path / 'state' / 'k-gone'}"]


@pytest.fixture
def jp_server_config() -> dict[str, object]:
    return {"ServerApp": {"jpserver_extensions": {"jupyter_server_ext": True}},
            "SandboxKernelsExtension": {"reap_on_start": False},
            "FakeProvisioner": {"place": "from-the-admin"}}


async def test_the_runtimes_endpoint_reports_every_record_with_the_servers_config(
        fakes: object, jp_fetch: Any) -> None:
    response = await jp_fetch("sandbox-kernels", "api", "runtimes")
    reports = {r["runtime"]: r for r in json.loads(response.body)}
    assert sorted(reports) == ["fake", "needy"]
    assert reports["fake"]["details"] == ["place from-the-admin"]
    assert not reports["needy"]["ok"]
