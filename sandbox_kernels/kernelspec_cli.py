"""``sandbox-kernels kernelspec create|list|remove``: kernelspecs made the way Jupyter users make them.

``create`` starts from the runtime's shipped kernelspec, puts the options into its
``metadata.kernel_provisioner.config``, and checks them with the very traits a kernel start
uses (types, bounds, and the policy that a kernelspec may only narrow isolation), so a bad value
fails here, naming the setting, rather than at the first kernel start.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any, Sequence

from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

from . import kernelspecs
from .errors import SandboxConfigError, SandboxNotFound
from .runtimes import registry
from .runtimes.registry import RuntimeRecord
from .settings import check_name, parse_size


def runtime_aliases() -> dict[str, str]:
    """The names users type for each runtime (``vm`` is the libvirt runtime), from the records."""
    return {record.user_name: record.name for record in registry.records()}


def runtime_for(name: str) -> RuntimeRecord:
    """The runtime record for a name a user typed (``vm``, ``docker``, ``k8s``, ``ssh``).

    Raises:
        SandboxConfigError: an unknown runtime name.
    """
    aliases = runtime_aliases()
    if name not in aliases:
        raise SandboxConfigError(
            f"--runtime {name!r} is not a runtime: use one of {', '.join(aliases)}.")
    return registry.get(aliases[name])


def provisioner_config(runtime: RuntimeRecord, *, memory: str | None = None, cpus: float | None = None,
                       image: str | None = None, host: str | None = None,
                       settings: Sequence[str] = ()) -> dict[str, Any]:
    """Turn the command's options into a kernelspec provisioner config.

    Raises:
        SandboxConfigError: an option the runtime does not offer, or a malformed ``--set``.
    """
    config: dict[str, Any] = {}
    given = {"memory": memory, "cpus": cpus, "image": image, "host": host}
    for option, value in given.items():
        if value is None:
            continue
        setting = runtime.options.get(option)
        if setting is None:
            raise SandboxConfigError(f"--{option} does not apply to the {runtime.kernel_name} runtime; "
                                     f"see `sandbox-kernels kernelspec create --help`.")
        if setting == "memory_mb":
            config[setting] = parse_size(value if any(c.isalpha() for c in value) else f"{value}m",
                                         "--memory") // (1 << 20)
        elif setting == "vcpus":
            if float(value) != int(value):  # type: ignore[arg-type]
                raise SandboxConfigError(f"--cpus {value} must be a whole number for VM kernels (vcpus).")
            config[setting] = int(value)  # type: ignore[arg-type]
        elif setting == "resources":
            limits = config.setdefault("resources", {}).setdefault("limits", {})
            limits["memory" if option == "memory" else "cpu"] = _k8s_quantity(option, value)
        elif setting == "host":
            config.update(_ssh_target(str(value)))
        else:
            config[setting] = value
    for item in settings:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SandboxConfigError(f"--set {item!r} must look like KEY=VALUE (VALUE may be JSON).")
        try:
            config[key] = json.loads(raw)
        except ValueError:
            config[key] = raw
    return config


def check_config(runtime: RuntimeRecord, kernel_spec: dict[str, Any], config: dict[str, Any]) -> None:
    """Build the provisioner as a kernel start would, so every setting is checked now.

    Raises:
        SandboxConfigError: unknown setting, bad value, or a setting a kernelspec may not widen.
    """
    from jupyter_client.kernelspec import KernelSpec

    cls = runtime.load("provisioner")
    provisioner = cls(kernel_id="kernelspec-check", kernel_spec=KernelSpec(**kernel_spec), **config)
    provisioner.validate_settings()


def create(name: str, runtime_name: str, *, display_name: str | None = None, memory: str | None = None,
           cpus: float | None = None, image: str | None = None, host: str | None = None,
           settings: Sequence[str] = (), user: bool = False, prefix: str | None = None) -> str:
    """Write kernelspec ``name`` for a runtime and return the directory it was installed in.

    Raises:
        SandboxConfigError: a bad name, option or setting (the message names it).
    """
    check_name(name, "kernelspec name")
    runtime = runtime_for(runtime_name)
    spec = json.loads((kernelspecs.templates_dir() / runtime.kernel_name / "kernel.json").read_text())
    config = provisioner_config(runtime, memory=memory, cpus=cpus, image=image, host=host, settings=settings)
    spec["display_name"] = display_name or f"{runtime.display_name} ({name})"
    spec["metadata"]["kernel_provisioner"]["config"] = config
    check_config(runtime, spec, config)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / name
        source.mkdir()
        (source / "kernel.json").write_text(json.dumps(spec, indent=1) + "\n")
        return KernelSpecManager().install_kernel_spec(str(source), kernel_name=name, user=user, prefix=prefix)


def sandbox_specs() -> dict[str, dict[str, Any]]:
    """Installed kernelspecs whose provisioner is one of ours, by name."""
    ours = {runtime.kernel_name: runtime for runtime in registry.records()}
    entry_points = {_provisioner_name(name): runtime for name, runtime in ours.items()}
    found = {}
    for name, info in KernelSpecManager().get_all_specs().items():
        provisioner = info["spec"].get("metadata", {}).get("kernel_provisioner", {})
        runtime = entry_points.get(provisioner.get("provisioner_name"))
        if runtime is not None:
            found[name] = {"runtime": runtime.name, "display_name": info["spec"]["display_name"],
                           "config": provisioner.get("config", {}), "resource_dir": info["resource_dir"]}
    return found


def remove(name: str) -> str:
    """Remove an installed sandbox kernelspec; returns the directory removed.

    Raises:
        SandboxNotFound: no sandbox kernelspec of that name (others are not ours to remove).
    """
    spec = sandbox_specs().get(name)
    if spec is None:
        raise SandboxNotFound(f"no sandbox kernelspec named {name!r}: `sandbox-kernels kernelspec list` "
                              f"shows them (other kernelspecs: `jupyter kernelspec remove`).")
    try:
        return KernelSpecManager().remove_kernel_spec(name)
    except NoSuchKernel as e:
        raise SandboxNotFound(str(e)) from e


def _provisioner_name(kernel_name: str) -> str:
    shipped = json.loads((kernelspecs.templates_dir() / kernel_name / "kernel.json").read_text())
    return str(shipped["metadata"]["kernel_provisioner"]["provisioner_name"])


def _k8s_quantity(option: str, value: Any) -> str:
    text = str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
    if option == "memory" and text[-1:].lower() in "kmgt" and not text.endswith("i"):
        text = f"{text[:-1]}{text[-1].upper()}i"  # 4g -> 4Gi, as Kubernetes spells it
    return text


def _ssh_target(target: str) -> dict[str, Any]:
    """``[user@]host[:port]`` into settings."""
    config: dict[str, Any] = {}
    user, at, rest = target.rpartition("@")
    if at:
        config["user"] = user
    host, colon, port = rest.rpartition(":") if rest.count(":") == 1 else ("", "", "")
    if colon:
        if not port.isdigit() or len(port) > 5:
            raise SandboxConfigError(f"--host {target!r}: the port after ':' must be a number.")
        config["host"], config["port"] = host, int(port)
    else:
        config["host"] = rest
    return config


# -- command line ---------------------------------------------------------------------------------

def _create(args: argparse.Namespace) -> int:
    prefix = kernelspecs.sys_prefix() if args.sys_prefix else args.prefix
    path = create(args.name, args.runtime, display_name=args.display_name, memory=args.memory,
                  cpus=args.cpus, image=args.image, host=args.host, settings=args.set,
                  user=args.user, prefix=prefix)
    display = json.loads((Path(path) / "kernel.json").read_text())["display_name"]
    print(f"installed kernelspec {args.name!r} ({display}) in {path}\n"
          f"  papermill -k {args.name} notebook.ipynb out.ipynb\n"
          f"  jupyter lab --allow-root   # then pick \"{display}\"\n"
          f"  sandbox-kernels kernelspec remove {args.name}")
    return 0


def _list(args: argparse.Namespace) -> int:
    specs = sandbox_specs()
    if args.json:
        print(json.dumps(specs, indent=1))
        return 0
    rows = [("NAME", "RUNTIME", "DISPLAY NAME", "SETTINGS")]
    rows += [(name, s["runtime"], s["display_name"],
              " ".join(f"{k}={json.dumps(v)}" for k, v in s["config"].items()) or "(defaults)")
             for name, s in sorted(specs.items())]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[3])
    return 0


def _remove(args: argparse.Namespace) -> int:
    print(f"removed {remove(args.name)}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``kernelspec create|list|remove`` to the ``sandbox-kernels`` parser."""
    group = sub.add_parser("kernelspec", help="create, list or remove sandbox kernelspecs").add_subparsers(
        dest="kernelspec_command", required=True)
    p = group.add_parser("create", help="write a kernelspec for a runtime with your settings")
    p.add_argument("name", help="kernel name (letters, digits, '_', '.', '-')")
    p.add_argument("--runtime", required=True, choices=list(runtime_aliases()))
    p.add_argument("--display-name", help="what JupyterLab shows (default: the runtime's, with NAME)")
    p.add_argument("--memory", help="memory, e.g. 4g (docker, vm, k8s)")
    p.add_argument("--cpus", type=float, help="CPUs (docker, vm, k8s)")
    p.add_argument("--image", help="image: Docker/Kubernetes image, or the VM's base qcow2")
    p.add_argument("--host", help="[user@]host[:port] of the SSH host")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other setting (VALUE may be JSON); repeatable")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="into the user's Jupyter data dir")
    where.add_argument("--sys-prefix", action="store_true", help="into the current environment")
    where.add_argument("--prefix", help="into PREFIX/share/jupyter/kernels")
    p.set_defaults(func=_create)
    p = group.add_parser("list", help="the installed sandbox kernelspecs and their settings")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_list)
    p = group.add_parser("remove", help="remove a sandbox kernelspec")
    p.add_argument("name")
    p.set_defaults(func=_remove)

