"""Every runtime record the package's entry points give is complete and consistent: its parts
load, its kernelspec names its provisioner, its options are settings. A new runtime's record is
checked here without a new test."""

from __future__ import annotations

import ast
import inspect
import json
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from sandbox_kernels.reap import OrphanFinder
from sandbox_kernels.runtimes import registry

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[2]
RECORDS = registry.records()


def test_the_shipped_runtimes_are_records() -> None:
    assert {"docker", "libvirt", "k8s", "ssh"} <= {r.name for r in RECORDS}
    assert len({r.user_name for r in RECORDS}) == len(RECORDS)  # what users type is unambiguous


@pytest.mark.parametrize("record", RECORDS, ids=[r.name for r in RECORDS])
def test_every_record_has_every_part(record: registry.RuntimeRecord) -> None:
    for part in ("name", "kernel_name", "display_name", "provisioner", "extra", "doctor", "orphans"):
        assert getattr(record, part), f"{record.name}: {part} is empty"
    cls = record.load("provisioner")
    assert (cls.runtime, cls.kernel_name) == (record.name, record.kernel_name)
    check = record.load("doctor")
    assert list(inspect.signature(check).parameters) == ["report", "settings"]
    finder = record.load("orphans")
    assert issubclass(finder, OrphanFinder)
    settings = record.settings()  # launches nothing
    finder(settings)  # concrete: every abstract method is implemented
    traits = cls.class_trait_names(config=True)
    for option, setting in record.options.items():
        assert option in {"memory", "cpus", "image", "host"}, option
        assert setting in traits, f"{record.name}: option --{option} sets unknown setting {setting}"
    for setting in record.reap_options:
        assert setting in traits, f"{record.name}: reap option --{setting} is not a setting"
    for part in ("image", "commands"):
        if getattr(record, part):
            assert callable(record.load(part))


@pytest.mark.parametrize("record", RECORDS, ids=[r.name for r in RECORDS])
def test_every_record_ships_a_kernelspec_naming_its_provisioner(record: registry.RuntimeRecord) -> None:
    spec = json.loads((REPO / "kernelspecs" / record.kernel_name / "kernel.json").read_text())
    assert spec["display_name"] == record.display_name
    name = spec["metadata"]["kernel_provisioner"]["provisioner_name"]
    provisioners = {ep.name: ep.value for ep in entry_points(group="jupyter_client.kernel_provisioners")}
    assert provisioners.get(name) == record.provisioner


@pytest.mark.parametrize("record", RECORDS, ids=[r.name for r in RECORDS])
def test_every_record_is_an_entry_point_with_a_pip_extra(record: registry.RuntimeRecord) -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert record.extra in project["optional-dependencies"]
    assert project["entry-points"][registry.ENTRY_POINT_GROUP][record.name].endswith(":RECORD")


#: The modules that serve every runtime: they may name none (no second list of runtimes).
GENERIC = ["sandbox_kernels/cli.py", "sandbox_kernels/doctor.py", "sandbox_kernels/reap.py",
           "sandbox_kernels/kernelspec_cli.py", "jupyter_server_ext/handlers.py", "tests/helpers/leaks.py",
           "tests/hostile/test_settings.py"]


@pytest.mark.parametrize("path", GENERIC)
def test_no_second_list_of_runtime_names(path: str) -> None:
    names = {r.name for r in RECORDS} | {r.user_name for r in RECORDS}
    tree = ast.parse((REPO / path).read_text())
    literals = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)}
    assert not names & literals, f"{path} names runtimes {sorted(names & literals)}: iterate the records"


def test_runtime_checks_read_their_settings_not_the_environment(monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    from types import SimpleNamespace

    from sandbox_kernels.doctor import RuntimeReport

    for variable in ("SANDBOX_K8S_KUBECONFIG", "SANDBOX_K8S_NAMESPACE", "SANDBOX_SSH_HOST"):
        monkeypatch.setenv(variable, "from-the-environment")
    missing = str(tmp_path / "no-kubeconfig")
    report = RuntimeReport("k8s", "sandbox-k8s", ok=True)
    registry.get("k8s").load("doctor")(report, SimpleNamespace(namespace="ns", kubeconfig=missing, context=""))
    assert not report.ok and missing in " ".join(report.details), report.details
    report = RuntimeReport("ssh", "sandbox-ssh", ok=True)
    registry.get("ssh").load("doctor")(report, SimpleNamespace(host="kernels.example.org"))
    assert "kernels.example.org" in " ".join(report.details)
    assert "from-the-environment" not in " ".join(report.details)


def test_reap_options_reach_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from sandbox_kernels import reap

    monkeypatch.setenv("SANDBOX_K8S_NAMESPACE", "from-the-environment")
    by_type = {type(f).__name__: f for f in reap.finders(namespace="from-the-command-line")}
    assert by_type["KubernetesOrphans"].settings.namespace == "from-the-command-line"
    assert {type(f).__name__: f for f in reap.finders()}["KubernetesOrphans"].settings.namespace == \
        "from-the-environment"
