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
import logging
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any

from ..errors import SandboxUnavailable

log = logging.getLogger(__name__)

#: The entry-point group whose values are runtime records.
ENTRY_POINT_GROUP = "sandbox_kernels.runtimes"


@dataclass(frozen=True)
class RuntimeRecord:
    """What a runtime is and where its parts live; every part is a lazy ``"module:attribute"``.

    Attributes:
        name: short name in labels, state directories, ``doctor`` and ``reap`` ("docker").
        kernel_name: the kernelspec it ships (``kernelspecs/<kernel_name>/kernel.json``).
        display_name: what JupyterLab shows for that kernelspec.
        provisioner: the provisioner class; its config traits are the runtime's settings.
        extra: the pip extra that brings its Python dependencies (``sandbox-kernels[extra]``).
        doctor: ``check(report, settings)``: fills a :class:`~sandbox_kernels.doctor.RuntimeReport`.
        orphans: a :class:`~sandbox_kernels.reap.OrphanFinder` subclass, built with the settings:
            its orphans for ``reap`` and its leak check for the test session.
        alias: the name users type in ``kernelspec create --runtime`` and ``image build``
            (default: ``name``; the libvirt runtime's is ``vm``).
        image: ``build(force) -> str`` for ``sandbox-kernels image build <alias>``, or "".
        commands: ``add_parser(subparsers)`` adding the runtime's own sub-commands, or "".
        options: ``kernelspec create`` option -> the setting it sets (``{"memory": "memory_mb"}``).
        reap_options: settings ``reap`` offers as ``--<setting>`` options, with their help.
    """

    name: str
    kernel_name: str
    display_name: str
    provisioner: str
    extra: str
    doctor: str
    orphans: str
    alias: str = ""
    image: str = ""
    commands: str = ""
    options: dict[str, str] = field(default_factory=dict, hash=False)
    reap_options: dict[str, str] = field(default_factory=dict, hash=False)

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
