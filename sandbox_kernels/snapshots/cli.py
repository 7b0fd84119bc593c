"""``sandbox-kernels snapshot create|list|rollback|delete KERNEL_ID [NAME]``."""

from __future__ import annotations

import argparse
import json


def _run(args: argparse.Namespace) -> int:
    from .control import SnapshotClient

    client = SnapshotClient(args.kernel_id)
    if args.action == "list":
        listing = client.list()
        if args.json:
            print(json.dumps(listing, indent=1))
        else:
            print(f"kernel {listing['kernel_id']} ({listing['runtime']}): {listing['note']}")
            for s in listing["snapshots"]:
                size = f"{s['size'] / 2**20:.1f} MiB" if s.get("size") else "-"
                print(f"  {s['name']:32} {s['kind']:10} {s['created']}  {size}{'  keep' if s['keep'] else ''}")
    elif args.action == "create":
        print(json.dumps(client.create(args.name, args.kind, args.keep)))
    elif args.action == "rollback":
        print(json.dumps(client.rollback(args.name)))
    else:
        client.delete(args.name)
        print(f"deleted {args.name}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register the ``snapshot`` sub-command."""
    p = sub.add_parser("snapshot", help="snapshot or roll back a running sandbox kernel")
    p.add_argument("action", choices=["create", "list", "rollback", "delete"])
    p.add_argument("kernel_id", help="the kernel's id (from the connection file name or the server)")
    p.add_argument("name", nargs="?", help="snapshot name (create: optional; rollback/delete: required)")
    p.add_argument("--kind", choices=["memory", "disk", "filesystem"], help="create: snapshot kind")
    p.add_argument("--keep", action="store_true", help="create: keep after the kernel is deleted")
    p.add_argument("--json", action="store_true", help="list: JSON output")
    p.set_defaults(func=_run)
