"""``sandbox-kernels reap``: find and remove sandboxes that no live process owns.

Everything we create carries owner labels (host and pid of the Jupyter server or papermill
process that started it). After a crash those processes are gone and their containers,
domains, pods, overlays and state directories are orphans. ``reap`` lists them (dry run, the
default) or removes them (``--yes``). Sandboxes of live owners are never touched.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import labels
from .cache import cache_dir
from .errors import SandboxError
from .runtimes.docker.dirs import remove_state_dir
from .settings import default_state_root


@dataclass
class Orphan:
    """One thing to remove."""

    kind: str
    name: str
    remove: Callable[[], None]
    kernel_id: str = ""  # whose files may go as soon as this is removed


def _containers() -> list[Orphan]:
    from .runtimes.docker.engine import DockerEngine

    try:
        engine = DockerEngine(timeout=10)
    except SandboxError:
        return []
    found = []
    for row in engine.find():
        if not labels.owner_alive(row.get("Labels") or {}):
            cid = row["Id"]
            found.append(Orphan("container", f"{row['Names'][0].lstrip('/')} ({cid[:12]})",
                                lambda cid=cid: engine.remove(cid),
                                (row.get("Labels") or {}).get(labels.KERNEL_ID, "")))
    return found


def _domains() -> list[Orphan]:
    try:
        from .runtimes.vm.libvirt_conn import LibvirtHost

        host = LibvirtHost()
        names = host.list_domains()
    except SandboxError:
        return []
    found = []
    for name in names:
        if not labels.owner_alive(host.labels(name)):
            found.append(Orphan("domain", name, lambda name=name: host.destroy(name),
                                name[len(labels.DOMAIN_PREFIX):]))
    return found


def _passt(existing: set[str]) -> list[Orphan]:
    """passt processes (the outbound NICs of VMs with allow_network) whose VM is gone.

    passt exits when its QEMU does, so these are stuck ones.
    """
    from .runtimes.vm import outbound

    return [Orphan("passt", f"pid {pid} (kernel {kid})", lambda pid=pid, kid=kid: outbound.stop_process(pid, kid))
            for pid, kid in outbound.leftover_processes() if kid not in existing]


def _pods(namespace: str, kubeconfig: str) -> list[Orphan]:
    """Kernel pods and their NetworkPolicies in ``namespace`` whose owner ran on this host and
    is gone (a policy is listed on its own too: it outlives a pod deleted by hand).

    Nothing is listed when no Kubernetes configuration exists or the cluster does not answer.
    """
    import socket

    from .runtimes.k8s.manifest import k8s_labels

    selector = f"{labels.PREFIX}/kernel-id"
    try:
        from .runtimes.k8s.api import KubeAPI

        api = KubeAPI(namespace, kubeconfig, request_timeout=10)
        pods = api.list_pods(selector)
        policies = api.list_network_policies(selector)
    except SandboxError:
        return []
    here = k8s_labels({labels.OWNER_HOST: socket.gethostname()})[f"{labels.PREFIX}/owner-host"]
    found = []
    for kind, items, delete in (("pod", pods, api.delete_pod),
                                ("network policy", policies, api.delete_network_policy)):
        for item in items:
            item_labels = item.metadata.labels or {}
            if item_labels.get(f"{labels.PREFIX}/owner-host") != here:
                continue  # another host's: never ours to judge
            owner = {labels.OWNER_HOST: socket.gethostname(),
                     labels.OWNER_PID: item_labels.get(f"{labels.PREFIX}/owner-pid", "0")}
            if not labels.owner_alive(owner):
                name = item.metadata.name
                found.append(Orphan(kind, f"{namespace}/{name}", lambda name=name, delete=delete: delete(name),
                                    item_labels.get(f"{labels.PREFIX}/kernel-id", "")))
    return found


def _directories(live_kernels: set[str], min_age: float, orphaned: frozenset[str] | set[str] = frozenset()) -> list[Orphan]:
    """State and overlay directories of kernels that are not live.

    Those of ``orphaned`` kernels (whose sandbox was just reaped) go at once; others only
    once older than ``min_age``.
    """
    found = []
    roots = [("state", Path(default_state_root())), ("overlay", cache_dir() / "ephemeral")]
    for kind, root in roots:  # orphans' files go once their domain or container is gone
        if not root.is_dir():
            continue
        for entry in root.iterdir():
            # A kernel being created has files before its domain or socket exists: spare
            # anything younger than min_age.
            old_enough = entry.name in orphaned or _age(entry) >= min_age
            if entry.is_dir() and entry.name not in live_kernels and old_enough:
                found.append(Orphan(kind, str(entry), lambda p=entry: remove_state_dir(p)))
    return found


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def find_orphans(min_age: float = 600.0, namespace: str = "", kubeconfig: str = "") -> list[Orphan]:
    """Orphaned containers, domains, pods, overlays and state directories of this host.

    A directory is kept while its kernel's control socket answers or any domain or container
    for its kernel id still exists (an orphaned one is reaped first, then its files). Pods are
    looked for in ``namespace`` (default: SANDBOX_K8S_NAMESPACE, else "default") of the
    cluster ``kubeconfig`` names (default: SANDBOX_K8S_KUBECONFIG, $KUBECONFIG, ~/.kube/config).
    """
    import os

    namespace = namespace or os.environ.get("SANDBOX_K8S_NAMESPACE", "") or "default"
    kubeconfig = kubeconfig or os.environ.get("SANDBOX_K8S_KUBECONFIG", "")
    orphans = _containers() + _domains() + _pods(namespace, kubeconfig)
    orphans += _passt(_existing_sandbox_ids())
    orphans += _directories(_live_kernels() | _existing_sandbox_ids(), min_age)
    return orphans


def _existing_sandbox_ids() -> set[str]:
    ids: set[str] = set()
    try:
        from .runtimes.docker.engine import DockerEngine

        engine = DockerEngine(timeout=10)
        ids |= {(row.get("Labels") or {}).get(labels.KERNEL_ID, "") for row in engine.find()}
    except SandboxError:
        pass
    try:
        from .runtimes.vm.libvirt_conn import LibvirtHost

        ids |= {name[len(labels.DOMAIN_PREFIX):] for name in LibvirtHost().list_domains()}
    except SandboxError:
        pass
    return ids


def _live_kernels() -> set[str]:
    """Kernel ids whose sandbox still has a live owner (their directories stay)."""
    live: set[str] = set()
    root = Path(default_state_root())
    if root.is_dir():
        for entry in root.iterdir():
            sock = entry / "control.sock"
            if sock.exists() and _socket_answers(sock):
                live.add(entry.name)
    return live


def _socket_answers(path: Path) -> bool:
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(2)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def reap(min_age: float = 600.0, namespace: str = "", kubeconfig: str = "") -> list[str]:
    """Remove every orphan (then the files that removal freed); return what was removed.

    Errors removing one orphan are reported in the list and do not stop the others.
    """
    done, reaped = [], set()
    for orphan in find_orphans(min_age, namespace, kubeconfig):
        try:
            orphan.remove()
            done.append(f"removed {orphan.kind} {orphan.name}")
            if orphan.kernel_id:
                reaped.add(orphan.kernel_id)
        except SandboxError as e:
            done.append(f"could not remove {orphan.kind} {orphan.name}: {e}")
    # The files of the sandboxes just removed (and any others old enough) go now.
    for orphan in _directories(_live_kernels() | _existing_sandbox_ids(), min_age, reaped):
        orphan.remove()
        done.append(f"removed {orphan.kind} {orphan.name}")
    return done


def _run(args: argparse.Namespace) -> int:
    orphans = find_orphans(args.min_age, args.namespace, args.kubeconfig)
    if not orphans:
        print("nothing to reap")
        return 0
    if args.yes:
        for line in reap(args.min_age, args.namespace, args.kubeconfig):
            print(line)
        return 0
    for orphan in orphans:
        print(f"would remove {orphan.kind} {orphan.name}")
    print("dry run: add --yes to remove them (files of orphaned VMs and containers too)")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register the ``reap`` sub-command."""
    p = sub.add_parser("reap", help="remove sandboxes whose owning process is gone (dry run by default)")
    p.add_argument("--yes", action="store_true", help="really remove them")
    p.add_argument("--min-age", type=float, default=600.0, metavar="SECONDS",
                   help="spare directories younger than this (a kernel may be starting); default 600")
    p.add_argument("--namespace", default="", help="Kubernetes namespace of kernel pods "
                   "(default: SANDBOX_K8S_NAMESPACE, else 'default')")
    p.add_argument("--kubeconfig", default="", help="kubeconfig of the cluster "
                   "(default: SANDBOX_K8S_KUBECONFIG, $KUBECONFIG, ~/.kube/config)")
    p.set_defaults(func=_run)
