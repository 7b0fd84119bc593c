"""Runtime records: one per runtime, found through one table, imported lazily.

Like fsspec's ``known_implementations``: a table from name to a record saying where the
runtime's parts live (``"module:attribute"`` strings), filled from the entry-point group
``sandbox_kernels.runtimes`` (each value names a :class:`RuntimeRecord`, normally
``RECORD`` in ``sandbox_kernels/runtimes/<name>/record.py``). Nothing of a runtime is imported
until one of its parts is asked for, and a missing optional package becomes "install
sandbox-kernels[libvirt]", never an ImportError traceback. Every tool that needs "all the
runtimes" (the CLI, ``doctor``, ``reap``, the server's ``runtimes`` endpoint, the kernelspec
command, the tests' leak check) iterates :func:`records`; no other list of runtime names exists.

A new runtime joins with one folder (``record.py``, ``doctor.py``, ``orphans.py`` beside its
provisioner), a kernelspec and two entry points: its provisioner's in
``jupyter_client.kernel_provisioners`` and its record's in ``sandbox_kernels.runtimes``.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any

from ..errors import SandboxUnavailable

log = logging.getLogger(__name__)

#: The entry-point group whose values are runtime records.
ENTRY_POINT_GROUP = "sandbox_kernels.runtimes"

#: The parts given as ``"module:attribute"`` (relative ones are resolved against the package).
_PARTS = ("provisioner", "doctor", "orphans", "image", "commands")


@dataclass(frozen=True)
class RuntimeRecord:
    """What a runtime is and where its parts live; every part is a lazy ``"module:attribute"``.

    A record states only what is its own: a part may be given relative to ``package`` (the
    record's own package, ``__package__`` in its ``record.py``) as ``".module:attribute"``, and
    is stored resolved (``"sandbox_kernels.runtimes.docker.provisioner:DockerProvisioner"``).
    Resolving imports nothing.

    Attributes:
        name: short name in labels, state directories, ``doctor`` and ``reap`` ("docker");
            default the last part of ``package`` (the runtime's folder: ``runtimes/docker``).
        kernel_name: the kernelspec it ships (``kernelspecs/<kernel_name>/kernel.json``);
            default ``sandbox-<name>``.
        display_name: what JupyterLab shows for that kernelspec (required).
        provisioner: the provisioner class; its config traits are the runtime's settings (required).
        extra: the pip extra that brings its Python dependencies (``sandbox-kernels[extra]``);
            default ``name``.
        doctor: ``check(report, settings)``: fills a :class:`~sandbox_kernels.doctor.RuntimeReport`;
            default ``check`` in the package's ``doctor`` module.
        orphans: a :class:`~sandbox_kernels.reap.OrphanFinder` subclass, built with the settings:
            its orphans for ``reap`` and its leak check for the test session (required).
        alias: the name users type in ``kernelspec create --runtime`` and ``image build``
            (default: ``name``; the libvirt runtime's is ``vm``).
        image: ``build(force) -> str`` for ``sandbox-kernels image build <alias>``, or "".
        commands: ``add_parser(subparsers)`` adding the runtime's own sub-commands, or "".
        options: ``kernelspec create`` option -> the setting it sets (``{"memory": "memory_mb"}``).
        reap_options: settings ``reap`` offers as ``--<setting>`` options, with their help.
        package: what the relative parts are relative to ("" when every part is absolute).

    Raises:
        ValueError: no name (nor package), a required part is missing, or a relative part
            has no ``package``.
    """

    name: str = ""
    kernel_name: str = ""
    display_name: str = ""
    provisioner: str = ""
    extra: str = ""
    doctor: str = ".doctor:check"
    orphans: str = ""
    alias: str = ""
    image: str = ""
    commands: str = ""
    options: dict[str, str] = field(default_factory=dict, hash=False)
    reap_options: dict[str, str] = field(default_factory=dict, hash=False)
    package: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", self.package.rpartition(".")[2])
        missing = [part for part in ("name", "display_name", "provisioner", "orphans") if not getattr(self, part)]
        if missing:
            raise ValueError(f"the {self.name} runtime's record has no {', '.join(missing)}")
        derived = {"kernel_name": self.kernel_name or f"sandbox-{self.name}", "extra": self.extra or self.name}
        for part in _PARTS:
            derived[part] = self._resolved(getattr(self, part))
        for part, value in derived.items():
            object.__setattr__(self, part, value)  # frozen: set once, here

    def _resolved(self, target: str) -> str:
        if not target.startswith("."):
            return target
        if not self.package:
            raise ValueError(f"the {self.name} runtime's part {target!r} is relative: give the record a package")
        module, _, attribute = target.partition(":")
        return f"{importlib.util.resolve_name(module, self.package)}:{attribute}"

    def variant(self, **changes: Any) -> RuntimeRecord:
        """A record for a runtime built on this one (gVisor on Docker): it keeps this record's
        pip extra, orphan finder, kernelspec options and reap options unless ``changes`` give
        them; everything else is the new runtime's own (given in ``changes``, or derived).

        Raises:
            ValueError: as the constructor.
        """
        kept = {part: getattr(self, part) for part in ("extra", "orphans", "options", "reap_options")}
        return RuntimeRecord(**{**kept, **changes})

    @property
    def user_name(self) -> str:
        """What users type for this runtime (``vm`` for libvirt)."""
        return self.alias or self.name

    def load(self, part: str = "provisioner") -> Any:
        """Import one part (``"provisioner"``, ``"doctor"``, ``"orphans"``, ``"image"``,
        ``"commands"``).

        Raises:
            SandboxUnavailable: its Python dependencies are missing (the message names the
                pip extra), or the record does not have that part.
        """
        target = getattr(self, part)
        if not target:
            raise SandboxUnavailable(f"the {self.name} runtime has no {part}")
        module_name, _, attribute = target.partition(":")
        return getattr(require(module_name, self.extra), attribute)

    def settings(self, config: Any = None) -> Any:
        """The runtime's settings: its provisioner, built from Jupyter ``config`` (admin
        configuration; the environment through the traits' defaults), launching nothing.

        Raises:
            SandboxUnavailable: its dependencies are missing.
            SandboxConfigError: the configuration holds an invalid value.
        """
        cls = self.load("provisioner")
        return cls(config=config) if config is not None else cls()


#: The table: runtime name -> record (filled from the entry points on first use).
known_runtimes: dict[str, RuntimeRecord] = {}
_loaded = False

_PACKAGE_EXTRA = {"docker": "docker", "libvirt": "libvirt", "kubernetes": "kubernetes",
                  "paramiko": "ssh"}


def register(record: RuntimeRecord, clobber: bool = False) -> None:
    """Add a record to the table (entry points do this; tests register fakes).

    Raises:
        ValueError: a record of that name exists and ``clobber`` is false.
    """
    _load_entry_points()
    if record.name in known_runtimes and not clobber and known_runtimes[record.name] != record:
        raise ValueError(f"a runtime named {record.name!r} is already registered")
    known_runtimes[record.name] = record


def refresh() -> None:
    """Forget the table and read the entry points again (after an install, or in tests)."""
    global _loaded
    known_runtimes.clear()
    _loaded = False
    _load_entry_points()


def records() -> list[RuntimeRecord]:
    """Every known runtime, in entry-point order."""
    _load_entry_points()
    return list(known_runtimes.values())


def get(name: str) -> RuntimeRecord:
    """The record of runtime ``name`` or of its alias (``vm``).

    Raises:
        SandboxUnavailable: unknown runtime (the message lists the known ones).
    """
    _load_entry_points()
    for record in known_runtimes.values():
        if name in (record.name, record.alias):
            return record
    raise SandboxUnavailable(f"unknown runtime {name!r}; known: {', '.join(known_runtimes)}")


def _load_entry_points() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            record = ep.load()
        except Exception as e:  # a broken plug-in must not take the others down
            log.warning("sandbox-kernels: runtime entry point %s = %s cannot be loaded: %s",
                        ep.name, ep.value, e)
            continue
        if not isinstance(record, RuntimeRecord) or record.name != ep.name:
            log.warning("sandbox-kernels: entry point %s = %s is not the RuntimeRecord named %r",
                        ep.name, ep.value, ep.name)
            continue
        known_runtimes.setdefault(record.name, record)


def require(module: str, extra: str | None = None) -> ModuleType:
    """Import an optional dependency or explain how to install it.

    Raises:
        SandboxUnavailable: the package is not installed; the message names the pip extra.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        missing = (e.name or module).split(".")[0]
        if missing == __name__.split(".")[0]:
            raise  # a module of ours is broken: a bug to see, not a package to install
        extra = _PACKAGE_EXTRA.get(missing) or extra or "all"
        raise SandboxUnavailable(
            f"the Python package {missing!r} is not installed: "
            f"`pip install 'sandbox-kernels[{extra}]'` (or `make demo`)."
        ) from e


def load(name: str) -> Any:
    """The provisioner class of runtime ``name``.

    Raises:
        SandboxUnavailable: unknown runtime, or its dependencies are missing.
    """
    return get(name).load("provisioner")
