"""A small, typed wrapper around libvirt-python for sandbox domains.

:class:`LibvirtHost` is the only place that touches ``libvirt`` objects and the only place that
catches ``libvirt.libvirtError``: each method translates it into our error tree with a message
a person can act on. Every call blocks; async callers use ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from typing import Any, Iterator

from ...errors import SandboxError, SandboxUnavailable
from ...labels import DOMAIN_PREFIX
from ...settings import check_name
from ..registry import require
from . import qemu_process
from .domain_xml import METADATA_NS, DomainSpec, SnapshotSpec, read_metadata
from .libvirt_errors import START_DAEMONS, lost_connection, message, start_error, translate

log = logging.getLogger("sandbox_kernels.vm")

DEFAULT_URI = "qemu:///system"


class LibvirtHost:
    """A connection to a libvirt daemon, with the few operations sandboxes need.

    Use as a context manager or call :meth:`close`. The connection opens on first use.
    """

    def __init__(self, uri: str = DEFAULT_URI) -> None:
        self.uri = uri
        self._conn: Any = None

    # -- connection ------------------------------------------------------------------------

    def __enter__(self) -> LibvirtHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def _libvirt(self) -> Any:
        return require("libvirt", "libvirt")

    def connect(self) -> Any:
        """Open the connection (once).

        Raises:
            SandboxUnavailable: libvirt-python is missing, or libvirtd does not answer.
        """
        if self._conn is not None:
            return self._conn
        libvirt = self._libvirt
        libvirt.registerErrorHandler(_quiet, None)  # errors become exceptions, not stderr noise
        try:
            self._conn = libvirt.open(self.uri)
        except libvirt.libvirtError as e:
            raise SandboxUnavailable(
                f"cannot connect to libvirt at {self.uri}: {message(e)}. Is libvirtd running? "
                f"{START_DAEMONS}."
            ) from e
        return self._conn

    def close(self) -> None:
        """Close the connection (idempotent)."""
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    @contextlib.contextmanager
    def _errors(self, what: str, name: str = "") -> Iterator[None]:
        """Translate ``libvirtError`` raised inside the block into our error tree."""
        libvirt = self._libvirt
        try:
            yield
        except libvirt.libvirtError as e:
            raise self._translate(e, what, name) from e

    def _translate(self, e: Any, what: str, name: str) -> SandboxError:
        if lost_connection(self._libvirt, e):
            self.close()
        return translate(self._libvirt, e, what, name)

    def _start_error(self, e: Any, what: str, name: str) -> SandboxError:
        return start_error(self._translate(e, what, name), e)

    # -- domains ---------------------------------------------------------------------------

    def start(self, spec: DomainSpec, paused: bool = False) -> str:
        """Create and start the domain described by ``spec`` (``paused``: QEMU runs, the guest not).

        A transient domain (the default) disappears when it stops; a persistent one
        (``spec.persistent``) is defined first and undefined again if it fails to start.

        Returns:
            The domain name.

        Raises:
            SandboxConfigError: a bad value in ``spec``.
            SandboxStartError: libvirt or QEMU refused to start it (the message says why).
            SandboxUnavailable: libvirtd is not reachable.
        """
        xml = spec.to_xml()
        conn = self.connect()
        libvirt = self._libvirt
        flags = libvirt.VIR_DOMAIN_START_PAUSED if paused else 0
        try:
            if spec.persistent:
                dom = conn.defineXML(xml)
                try:
                    dom.createWithFlags(flags)
                except libvirt.libvirtError:
                    with contextlib.suppress(libvirt.libvirtError):
                        dom.undefineFlags(_undefine_flags(libvirt))
                    raise
            else:
                conn.createXML(xml, flags)
        except libvirt.libvirtError as e:
            raise self._start_error(e, "starting the VM", spec.name) from e
        return spec.name

    def state(self, name: str) -> str:
        """The domain's state: ``running``, ``paused``, ``shutoff``, ``crashed``, ``other`` or
        ``missing``.

        Raises:
            SandboxUnavailable: libvirtd is not reachable.
        """
        dom = self._lookup(name, missing_ok=True)
        if dom is None:
            return "missing"
        libvirt = self._libvirt
        with self._errors("reading the VM state", name):
            try:
                code = dom.state()[0]
            except libvirt.libvirtError as e:
                if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return "missing"  # went away between lookup and state
                raise
        return {
            libvirt.VIR_DOMAIN_RUNNING: "running",
            libvirt.VIR_DOMAIN_BLOCKED: "running",
            libvirt.VIR_DOMAIN_PAUSED: "paused",
            libvirt.VIR_DOMAIN_PMSUSPENDED: "paused",
            libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
            libvirt.VIR_DOMAIN_SHUTDOWN: "running",
            libvirt.VIR_DOMAIN_CRASHED: "crashed",
        }.get(code, "other")

    def destroy(self, name: str) -> bool:
        """Stop the domain at once (if running) and undefine it with its snapshot metadata.

        Returns:
            Whether there was a domain to remove.

        Raises:
            SandboxUnavailable: libvirtd is not reachable.
            SandboxError: libvirt refused (the message says why).
        """
        libvirt = self._libvirt
        dom = self._lookup(name, missing_ok=True)
        if dom is None:
            return False
        with self._errors("destroying the VM", name):
            try:
                if dom.isActive():
                    dom.destroy()
                if dom.isPersistent():
                    dom.undefineFlags(_undefine_flags(libvirt))
            except libvirt.libvirtError as e:
                if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise
        return True

    def list_domains(self, prefix: str = DOMAIN_PREFIX) -> list[str]:
        """Names of all domains (running or defined) whose name starts with ``prefix``.

        Raises:
            SandboxUnavailable: libvirtd is not reachable.
        """
        conn = self.connect()
        with self._errors("listing VMs"):
            return sorted(d.name() for d in conn.listAllDomains(0) if d.name().startswith(prefix))

    def labels(self, name: str) -> dict[str, str]:
        """The labels stored in the domain's ``<metadata>`` (``{}`` if it has none).

        Raises:
            SandboxNotFound: no such domain.
        """
        libvirt = self._libvirt
        dom = self._lookup(name)
        with self._errors("reading the VM metadata", name):
            try:
                text = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS, 0)
            except libvirt.libvirtError as e:
                if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
                    return {}
                raise
        return read_metadata(text)

    def xml(self, name: str) -> str:
        """The live XML of the domain (for diagnostics and tests).

        Raises:
            SandboxNotFound: no such domain.
        """
        dom = self._lookup(name)
        with self._errors("reading the VM XML", name):
            return str(dom.XMLDesc(0))

    def qemu_pid(self, name: str) -> int | None:
        """The PID of the domain's QEMU process, or ``None`` if it is not running."""
        if self.state(name) not in ("running", "paused"):
            return None
        return qemu_process.qemu_pid(name)

    def emulator_identity(self) -> tuple[int, list[int]]:
        """The uid and gids QEMU runs as on this connection (see
        :func:`.qemu_process.emulator_identity`)."""
        return qemu_process.emulator_identity(self.uri)

    def restart_xml(self, name: str) -> str:
        """The domain's XML in the form that recreates it (``VIR_DOMAIN_XML_MIGRATABLE``).

        Raises:
            SandboxNotFound: no such domain.
        """
        dom = self._lookup(name)
        with self._errors("reading the VM XML", name):
            return str(dom.XMLDesc(self._libvirt.VIR_DOMAIN_XML_MIGRATABLE))

    def start_xml(self, name: str, xml: str) -> None:
        """Start a transient domain from ``xml`` (as :meth:`restart_xml` returned it).

        Raises:
            SandboxStartError: libvirt or QEMU refused to start it.
            SandboxUnavailable: libvirtd is not reachable.
        """
        conn = self.connect()
        try:
            conn.createXML(xml, 0)
        except self._libvirt.libvirtError as e:
            raise self._start_error(e, "starting the VM again", name) from e

    def qmp(self, name: str, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one QMP command on the domain's QEMU and return its ``return`` value.

        For what libvirt does not offer on a running domain (internal disk-only snapshots).

        Raises:
            SandboxNotFound: no such domain.
            SandboxError: QEMU refused the command (its message is included).
        """
        qemu = require("libvirt_qemu", "libvirt")
        dom = self._lookup(name)
        request = json.dumps({"execute": command, "arguments": arguments or {}})
        with self._errors(f"QEMU command {command}", name):
            reply = json.loads(qemu.qemuMonitorCommand(dom, request, 0))
        if "error" in reply:
            raise SandboxError(f"QEMU command {command} ({name}): {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    # -- snapshots -------------------------------------------------------------------------

    def snapshot_create(self, name: str, snapshot: str, memory: bool = True,
                        description: str = "") -> None:
        """Take an internal snapshot of domain ``name`` (with its memory if ``memory``).

        Raises:
            SandboxConfigError: a bad snapshot name.
            SandboxNotFound: no such domain.
            SandboxError: libvirt or QEMU refused (e.g. a disk-only snapshot of a running VM).
        """
        xml = SnapshotSpec(snapshot, memory=memory, description=description).to_xml()
        dom = self._lookup(name)
        libvirt = self._libvirt
        with self._errors(f"taking snapshot {snapshot!r}", name):
            dom.snapshotCreateXML(xml, libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC)

    def snapshot_revert(self, name: str, snapshot: str) -> None:
        """Revert running domain ``name`` to its memory snapshot ``snapshot`` and run it.

        The snapshot is loaded into the domain's own QEMU (:meth:`load_snapshot`): libvirt's
        revert would start a new QEMU process for it, about 2.5 s more under TCG.

        Raises:
            SandboxNotFound: no such domain or snapshot.
            SandboxError: QEMU could not load it.
        """
        dom = self._lookup(name)
        with self._errors(f"reverting to snapshot {snapshot!r}", name):
            dom.snapshotLookupByName(snapshot, 0)
        self.load_snapshot(name, snapshot)
        if self.state(name) == "paused":
            self.resume(name)

    def resume(self, name: str) -> None:
        """Run a paused domain.

        Raises:
            SandboxNotFound: no such domain.
        """
        dom = self._lookup(name)
        with self._errors("resuming the VM", name):
            dom.resume()

    def load_snapshot(self, name: str, snapshot: str) -> None:
        """Load the internal snapshot ``snapshot`` (with memory) in domain ``name``'s QEMU.

        The snapshot need not be known to libvirt (a golden snapshot in a cloned overlay). A
        running domain runs on from the snapshot; a paused one stays paused.

        Raises:
            SandboxNotFound: no such domain.
            SandboxError: QEMU could not load it (its message is included).
        """
        output = self.qmp(name, "human-monitor-command",
                          {"command-line": f"loadvm {check_name(snapshot, 'snapshot name')}"})
        if str(output or "").strip():
            raise SandboxError(f"QEMU could not load snapshot {snapshot!r} of {name}: {str(output).strip()}")

    def snapshot_delete(self, name: str, snapshot: str) -> None:
        """Delete ``snapshot`` of domain ``name``.

        Raises:
            SandboxNotFound: no such domain or snapshot.
        """
        dom = self._lookup(name)
        with self._errors(f"deleting snapshot {snapshot!r}", name):
            dom.snapshotLookupByName(snapshot, 0).delete(0)

    def snapshot_xmls(self, name: str) -> list[str]:
        """Each snapshot's metadata XML, oldest first, for :meth:`snapshot_redefine`.

        A transient domain's snapshot metadata goes with the domain; the snapshots themselves
        stay in the qcow2 files.

        Raises:
            SandboxNotFound: no such domain.
        """
        dom = self._lookup(name)
        with self._errors("reading snapshot metadata", name):
            snaps = sorted(dom.listAllSnapshots(0), key=_creation_time)
            return [str(s.getXMLDesc(self._libvirt.VIR_DOMAIN_SNAPSHOT_XML_SECURE)) for s in snaps]

    def snapshot_redefine(self, name: str, xmls: list[str]) -> None:
        """Give domain ``name`` back the snapshot metadata :meth:`snapshot_xmls` returned.

        Raises:
            SandboxNotFound: no such domain.
            SandboxError: libvirt refused the metadata.
        """
        dom = self._lookup(name)
        libvirt = self._libvirt
        with self._errors("restoring snapshot metadata", name):
            for xml in xmls:
                dom.snapshotCreateXML(xml, libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE)

    def snapshot_list(self, name: str) -> list[str]:
        """Snapshot names of domain ``name``, oldest first.

        Raises:
            SandboxNotFound: no such domain.
        """
        dom = self._lookup(name)
        with self._errors("listing snapshots", name):
            snaps = dom.listAllSnapshots(0)
            return [s.getName() for s in sorted(snaps, key=_creation_time)]

    # -- helpers ---------------------------------------------------------------------------

    def _lookup(self, name: str, missing_ok: bool = False) -> Any:
        conn = self.connect()
        libvirt = self._libvirt
        try:
            return conn.lookupByName(name)
        except libvirt.libvirtError as e:
            if missing_ok and e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise self._translate(e, "looking up the VM", name) from e


def _quiet(_ctx: object, _err: object) -> None:
    """libvirt error handler that prints nothing (errors arrive as exceptions)."""


def _undefine_flags(libvirt: Any) -> int:
    return int(libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
               | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)


def _creation_time(snap: Any) -> int:
    match = re.search(r"<creationTime>(\d+)</creationTime>", snap.getXMLDesc(0))
    return int(match.group(1)) if match else 0
