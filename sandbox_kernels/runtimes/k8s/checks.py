"""Checks of the Kubernetes settings: names, quantities, labels, tolerations.

Patterns are applied with ``fullmatch`` (``re.match`` with ``$`` accepts a trailing newline).
"""

from __future__ import annotations

import re
from typing import Any

from ...errors import SandboxConfigError

DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
QUANTITY = re.compile(r"[0-9]{1,18}(\.[0-9]{1,9})?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?")
LABEL_KEY = re.compile(r"([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")
TOLERATION_KEYS = {"key", "operator", "value", "effect", "tolerationSeconds"}


def check_resources(resources: dict[str, Any]) -> None:
    """Refuse anything but ``{requests|limits: {cpu|memory|ephemeral-storage: quantity}}``.

    Raises:
        SandboxConfigError: naming the first bad entry.
    """
    for kind, values in resources.items():
        if kind not in ("requests", "limits") or not isinstance(values, dict):
            raise SandboxConfigError(
                f"resources: {kind!r} must be 'requests' or 'limits', each a dict of cpu/memory.")
        for name, quantity in values.items():
            if name not in ("cpu", "memory", "ephemeral-storage"):
                raise SandboxConfigError(f"resources.{kind}: unknown resource {name!r} "
                                         "(cpu, memory, ephemeral-storage).")
            if not QUANTITY.fullmatch(str(quantity)):
                raise SandboxConfigError(f"resources.{kind}.{name}={quantity!r} is not a Kubernetes "
                                         "quantity (e.g. '500m', '2Gi').")


def check_node_selector(node_selector: dict[str, Any]) -> None:
    """Raises SandboxConfigError unless every entry is a label key and value."""
    for key, value in node_selector.items():
        if not (isinstance(key, str) and LABEL_KEY.fullmatch(key)
                and isinstance(value, str) and LABEL_VALUE.fullmatch(value)):
            raise SandboxConfigError(f"node_selector entry {key!r}: {value!r} is not a label.")


def check_tolerations(tolerations: list[dict[str, Any]]) -> None:
    """Raises SandboxConfigError on a toleration field Kubernetes does not know."""
    for toleration in tolerations:
        unknown = set(toleration) - TOLERATION_KEYS
        if unknown:
            raise SandboxConfigError(f"tolerations: unknown field(s) {sorted(unknown)} in {toleration!r}.")
