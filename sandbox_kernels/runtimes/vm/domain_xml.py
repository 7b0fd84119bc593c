"""Declarative builders for libvirt domain and snapshot XML.

Small frozen dataclasses describe what a sandbox VM is; ``to_xml()`` turns them into XML with
:mod:`xml.etree.ElementTree`, so every value (paths, names, labels) is escaped by the XML
writer and never formatted into markup. Names are validated against a strict pattern first.

Networking is QEMU user-mode (slirp) networking, given on the QEMU command line through
libvirt's ``qemu`` namespace, because libvirt 9.0's ``<interface type='user'>`` can forward
ports only with the passt backend and cannot express ``restrict``::

    -netdev user,id=sk0,restrict=on,ipv6=off,hostfwd=tcp:127.0.0.1:<port>-:22
    -device virtio-net-pci,netdev=sk0,id=sk-net0,bus=pci.0,addr=0x1e,romfile=

The forward binds the host's loopback only; ``restrict=on`` (always) cuts the guest off from
everything but that forward. A VM with outbound network gets a second NIC of its own, served
by passt (see :mod:`sandbox_kernels.runtimes.vm.outbound`), which cannot reach this machine::

    -netdev stream,id=sk1,server=off,addr.type=unix,addr.path=<state>/outbound.sock
    -device virtio-net-pci,netdev=sk1,id=sk-net1,bus=pci.0,addr=0x1f,mac=52:54:00:5a:4b:01,romfile=
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from ...errors import SandboxConfigError
from ...labels import DOMAIN_PREFIX
from ...settings import check_name
from .outbound import GUEST_MAC

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
#: Namespace of our ``<metadata>`` element (an identifier, never fetched).
METADATA_NS = "https://sandbox-kernels.invalid/xmlns/domain/1"
DOMAIN_TYPES = ("kvm", "qemu")
SERIAL_ROOT = "sandbox-root"
SERIAL_SEED = "sandbox-seed"
SERIAL_WORKSPACE = "sandbox-workspace"
#: ``no_timer_check``: under TCG on a busy host the kernel's IO-APIC timer check can fail
#: ("IO-APIC + timer doesn't work!") and panic the guest at boot; the check proves nothing here.
DEFAULT_CMDLINE = ("console=ttyS0", "root=/dev/vda", "rw", "init=/sbin/sandbox-init", "quiet",
                   "panic=-1", "fsck.mode=skip", "no_timer_check")
#: PCI slot of the network card, which libvirt does not know about: its own devices take the
#: lowest free slots from 0x2 up, so a high slot never collides.
NET_PCI_SLOT = "0x1e"
#: The outbound NIC's slot: after the SSH NIC's, so the guest names that one eth0 still.
OUTBOUND_PCI_SLOT = "0x1f"
#: What a VM may be given: the provisioner's traits (memory_mb, vcpus, extra_cmdline) and the
#: domain builder check with these same functions, so a value has one set of bounds.
MEMORY_MIB_RANGE = (128, 256 * 1024)
VCPUS_RANGE = (1, 64)
_CMDLINE_TOKEN = re.compile(r"[A-Za-z0-9_.,:/=+-]{1,200}")
_LABEL_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,62}")

ET.register_namespace("qemu", QEMU_NS)
ET.register_namespace("sk", METADATA_NS)


def check_memory_mib(value: int) -> int:
    """Guest memory in MiB, within :data:`MEMORY_MIB_RANGE`.

    Raises:
        SandboxConfigError: out of range.
    """
    return _within("memory_mb", value, MEMORY_MIB_RANGE)


def check_vcpus(value: int) -> int:
    """Guest CPUs, within :data:`VCPUS_RANGE`.

    Raises:
        SandboxConfigError: out of range.
    """
    return _within("vcpus", value, VCPUS_RANGE)


def _within(setting: str, value: int, bounds: tuple[int, int]) -> int:
    """``value`` if it is an int (not a bool) within ``bounds`` (inclusive).

    Raises:
        SandboxConfigError: it is not; the message names ``setting`` and the bounds.
    """
    low, high = bounds
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise SandboxConfigError(f"{setting}={value!r} is out of range: use {low} to {high}.")
    return int(value)


def check_cmdline_word(word: str) -> str:
    """One extra word of the guest kernel command line (a strict pattern: no spaces, quotes,
    semicolons or control characters).

    Raises:
        SandboxConfigError: the word has other characters.
    """
    if not isinstance(word, str) or not _CMDLINE_TOKEN.fullmatch(word):
        raise SandboxConfigError(
            f"kernel command line word {word!r} (extra_cmdline) is not allowed: use letters, "
            "digits and _ . , : / = + - only.")
    return word


def domain_name(kernel_id: str) -> str:
    """``sandbox-kernels-<kernel id>``, after checking the id against the strict name pattern.

    Raises:
        SandboxConfigError: the kernel id has characters outside ``[A-Za-z0-9_.-]``.
    """
    return f"{DOMAIN_PREFIX}{check_name(kernel_id, 'kernel id')}"


@dataclass(frozen=True)
class Disk:
    """One virtio disk.

    Attributes:
        path: the image file.
        target: the guest device name (``vda``, ``vdb``, ...).
        serial: the virtio serial the guest finds the disk by.
        format: ``qcow2`` or ``raw``.
        readonly: attach read-only (the seed).
        snapshot: include in internal snapshots (read-only raw disks cannot be).
    """

    path: str
    target: str
    serial: str
    format: str = "qcow2"
    readonly: bool = False
    snapshot: bool = True

    def element(self) -> ET.Element:
        """The ``<disk>`` element."""
        if self.format not in ("qcow2", "raw"):
            raise SandboxConfigError(f"disk format {self.format!r} must be qcow2 or raw.")
        if not re.fullmatch(r"vd[a-z]", self.target):
            raise SandboxConfigError(f"disk target {self.target!r} must be vda..vdz.")
        check_name(self.serial, "disk serial")
        disk = ET.Element("disk", type="file", device="disk")
        if not self.snapshot:
            disk.set("snapshot", "no")
        driver = ET.SubElement(disk, "driver", name="qemu", type=self.format)
        if not self.readonly:
            driver.set("discard", "unmap")
        ET.SubElement(disk, "source", file=str(self.path))
        ET.SubElement(disk, "target", dev=self.target, bus="virtio")
        ET.SubElement(disk, "serial").text = self.serial
        if self.readonly:
            ET.SubElement(disk, "readonly")
        return disk


@dataclass(frozen=True)
class DomainSpec:
    """A sandbox VM: direct kernel boot, root overlay, seed, optional workspace, slirp network.

    Attributes:
        kernel_id: the Jupyter kernel id; names the domain ``sandbox-kernels-<kernel id>``.
        domain_type: ``kvm`` (hardware virtualization) or ``qemu`` (TCG emulation).
        memory_mib: guest memory in MiB.
        vcpus: virtual CPUs.
        kernel: the guest kernel (``vmlinuz``) for direct boot.
        initrd: its initrd, or ``None``.
        root: the per-kernel qcow2 overlay (``vda``, serial ``sandbox-root``).
        seed: the raw seed disk (``vdb``, read-only, serial ``sandbox-seed``).
        serial_log: the file the serial console is written to.
        ssh_port: host port on 127.0.0.1 forwarded to the guest's port 22.
        allow_network: give the guest its outbound NIC (passt at ``outbound_socket``).
        workspace: a qcow2 workspace disk (``vdc``, serial ``sandbox-workspace``), or ``None``.
        reseed_socket: a unix socket (QEMU listens) wired to the guest's second serial port,
            where the host tells a VM restored from a golden snapshot to reseed; or ``None``.
        outbound_socket: the unix socket QEMU connects the outbound NIC to (we listen there
            and hand the connection to passt); required with ``allow_network``.
        extra_cmdline: more kernel command line words (checked against a strict pattern).
        labels: owner labels stored in the domain's ``<metadata>``.
        persistent: hint for :class:`~sandbox_kernels.runtimes.vm.libvirt_conn.LibvirtHost`.
    """

    kernel_id: str
    domain_type: str
    memory_mib: int
    vcpus: int
    kernel: str
    initrd: str | None
    root: str
    seed: str
    serial_log: str
    ssh_port: int
    allow_network: bool = False
    workspace: str | None = None
    reseed_socket: str | None = None
    outbound_socket: str | None = None
    extra_cmdline: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    persistent: bool = False

    @property
    def name(self) -> str:
        """The domain name, ``sandbox-kernels-<kernel id>``."""
        return domain_name(self.kernel_id)

    @property
    def cmdline(self) -> str:
        """The guest kernel command line."""
        for word in self.extra_cmdline:
            check_cmdline_word(word)
        return " ".join(DEFAULT_CMDLINE + tuple(self.extra_cmdline))

    def disks(self) -> list[Disk]:
        """The disks in guest order: root, seed, workspace."""
        disks = [Disk(self.root, "vda", SERIAL_ROOT, "qcow2"),
                 Disk(self.seed, "vdb", SERIAL_SEED, "raw", readonly=True, snapshot=False)]
        if self.workspace:
            disks.append(Disk(self.workspace, "vdc", SERIAL_WORKSPACE, "qcow2"))
        return disks

    def netdev_args(self) -> list[str]:
        """The QEMU arguments of the sandbox's network: slirp restricted to the SSH forward on
        127.0.0.1, and with ``allow_network`` the outbound NIC."""
        if not isinstance(self.ssh_port, int) or not 1024 <= self.ssh_port <= 65535:
            raise SandboxConfigError(f"ssh_port {self.ssh_port!r} must be a port in 1024-65535.")
        args = ["-netdev",
                f"user,id=sk0,restrict=on,ipv6=off,hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22",
                "-device", f"virtio-net-pci,netdev=sk0,id=sk-net0,bus=pci.0,addr={NET_PCI_SLOT},romfile="]
        if self.allow_network:
            path = str(self.outbound_socket or "")
            if not path.startswith("/") or "," in path or len(path) > 100:
                raise SandboxConfigError(
                    f"allow_network needs an absolute outbound socket path without commas, under "
                    f"100 characters (got {path!r}).")
            args += ["-netdev", f"stream,id=sk1,server=off,addr.type=unix,addr.path={path}",
                     "-device", f"virtio-net-pci,netdev=sk1,id=sk-net1,bus=pci.0,"
                                f"addr={OUTBOUND_PCI_SLOT},mac={GUEST_MAC},romfile="]
        return args

    def validate(self) -> None:
        """Check every value before any XML is made.

        Raises:
            SandboxConfigError: a value is out of range or not allowed; the message names it.
        """
        domain_name(self.kernel_id)
        if self.domain_type not in DOMAIN_TYPES:
            raise SandboxConfigError(f"domain type {self.domain_type!r} must be kvm or qemu.")
        check_memory_mib(self.memory_mib)
        check_vcpus(self.vcpus)
        for key in self.labels:
            if not _LABEL_KEY.fullmatch(key):
                raise SandboxConfigError(f"label name {key!r} is not allowed.")
        self.cmdline  # noqa: B018 - validates the words
        self.netdev_args()

    def to_xml(self) -> str:
        """The domain XML (validated; every value escaped by ElementTree).

        Raises:
            SandboxConfigError: see :meth:`validate`.
        """
        self.validate()
        dom = ET.Element("domain", type=self.domain_type)
        ET.SubElement(dom, "name").text = self.name
        ET.SubElement(dom, "title").text = f"sandbox-kernels kernel {self.kernel_id}"
        # A VM generation id: libvirt picks a new one per start, so a clone restored from a
        # golden snapshot tells its guest kernel (vmgenid) to reseed its random generator.
        ET.SubElement(dom, "genid")
        metadata = ET.SubElement(dom, "metadata")
        sandbox = ET.SubElement(metadata, f"{{{METADATA_NS}}}sandbox")
        ET.SubElement(sandbox, f"{{{METADATA_NS}}}kernel-id").text = self.kernel_id
        for key, value in sorted(self.labels.items()):
            ET.SubElement(sandbox, f"{{{METADATA_NS}}}label", name=key).text = str(value)
        ET.SubElement(dom, "memory", unit="MiB").text = str(self.memory_mib)
        ET.SubElement(dom, "vcpu").text = str(self.vcpus)
        os_el = ET.SubElement(dom, "os")
        ET.SubElement(os_el, "type", arch="x86_64").text = "hvm"
        ET.SubElement(os_el, "kernel").text = str(self.kernel)
        if self.initrd:
            ET.SubElement(os_el, "initrd").text = str(self.initrd)
        ET.SubElement(os_el, "cmdline").text = self.cmdline
        features = ET.SubElement(dom, "features")
        ET.SubElement(features, "acpi")
        if self.domain_type == "kvm":
            ET.SubElement(dom, "cpu", mode="host-passthrough")
        ET.SubElement(dom, "clock", offset="utc")
        for event in ("on_poweroff", "on_reboot", "on_crash"):
            ET.SubElement(dom, event).text = "destroy"
        devices = ET.SubElement(dom, "devices")
        for disk in self.disks():
            devices.append(disk.element())
        ET.SubElement(devices, "controller", type="usb", model="none")
        serial = ET.SubElement(devices, "serial", type="file")
        ET.SubElement(serial, "source", path=str(self.serial_log), append="off")
        ET.SubElement(serial, "target", port="0")
        if self.reseed_socket:
            reseed = ET.SubElement(devices, "serial", type="unix")
            ET.SubElement(reseed, "source", mode="bind", path=str(self.reseed_socket))
            ET.SubElement(reseed, "target", port="1")
        rng = ET.SubElement(devices, "rng", model="virtio")
        ET.SubElement(rng, "backend", model="random").text = "/dev/urandom"
        ET.SubElement(devices, "memballoon", model="none")
        commandline = ET.SubElement(dom, f"{{{QEMU_NS}}}commandline")
        for arg in self.netdev_args():
            ET.SubElement(commandline, f"{{{QEMU_NS}}}arg", value=arg)
        return ET.tostring(dom, encoding="unicode")


@dataclass(frozen=True)
class SnapshotSpec:
    """An internal libvirt snapshot of a sandbox.

    Attributes:
        name: the snapshot name (strict name pattern).
        memory: include the guest's memory (a running domain; resumes where it was). Without
            memory the snapshot is of the disks only, which QEMU takes internally only while
            the domain is shut off.
        description: free text (escaped).
        skip_disks: guest disks left out (the read-only raw seed).
    """

    name: str
    memory: bool = True
    description: str = ""
    skip_disks: tuple[str, ...] = ("vdb",)

    def to_xml(self) -> str:
        """The ``<domainsnapshot>`` XML.

        Raises:
            SandboxConfigError: a bad snapshot name.
        """
        snap = ET.Element("domainsnapshot")
        ET.SubElement(snap, "name").text = check_name(self.name, "snapshot name")
        if self.description:
            ET.SubElement(snap, "description").text = self.description
        ET.SubElement(snap, "memory", snapshot="internal" if self.memory else "no")
        if self.skip_disks:
            disks = ET.SubElement(snap, "disks")
            for target in self.skip_disks:
                ET.SubElement(disks, "disk", name=target, snapshot="no")
        return ET.tostring(snap, encoding="unicode")


def read_metadata(metadata_xml: str) -> dict[str, str]:
    """Parse our ``<sandbox>`` metadata element (as libvirt returns it) back into ``{"kernel-id": ..., label: ...}``.

    Raises:
        SandboxConfigError: the text is not our metadata element.
    """
    try:
        root = ET.fromstring(metadata_xml)
    except ET.ParseError as e:
        raise SandboxConfigError(f"domain metadata is not XML: {e}") from e
    if _local(root.tag) != "sandbox":
        raise SandboxConfigError(f"domain metadata element is {root.tag}, not ours.")
    found: dict[str, str] = {}
    for child in root:
        if _local(child.tag) == "kernel-id":
            found["kernel-id"] = child.text or ""
        elif _local(child.tag) == "label" and child.get("name"):
            found[child.get("name", "")] = child.text or ""
    return found


def _local(tag: str) -> str:
    """A tag without its namespace (libvirt returns metadata with the namespace stripped)."""
    return tag.rsplit("}", 1)[-1]
