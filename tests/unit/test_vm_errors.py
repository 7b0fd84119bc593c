"""libvirt's errors mapped into the typed error tree, without libvirt (a fake module)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from sandbox_kernels.errors import (
    SandboxError,
    SandboxNotFound,
    SandboxStartError,
    SandboxTimeout,
    SandboxUnavailable,
)
from sandbox_kernels.runtimes.vm.libvirt_errors import start_error, translate

LIBVIRT = SimpleNamespace(VIR_ERR_NO_DOMAIN=42, VIR_ERR_NO_DOMAIN_SNAPSHOT=72,
                          VIR_ERR_OPERATION_TIMEOUT=68, VIR_ERR_NO_CONNECT=5,
                          VIR_ERR_SYSTEM_ERROR=38, VIR_FROM_RPC=7, VIR_ERR_OPERATION_INVALID=55)


class FakeError(Exception):
    def __init__(self, code: int, text: str, domain: int = 0) -> None:
        super().__init__(text)
        self.code, self.text, self.domain = code, text, domain

    def get_error_code(self) -> int:
        return self.code

    def get_error_message(self) -> str:
        return self.text

    def get_error_domain(self) -> int:
        return self.domain


@pytest.mark.parametrize("code, domain, kind, words", [
    (42, 0, SandboxNotFound, "The VM is gone"),
    (72, 0, SandboxNotFound, "List snapshots"),
    (68, 0, SandboxTimeout, "busy"),
    (38, 7, SandboxUnavailable, "libvirtd -d"),
    (5, 7, SandboxUnavailable, "Lost libvirtd"),
    (55, 0, SandboxError, "not in a state"),
    (1, 0, SandboxError, "boom"),
])
def test_libvirt_errors_become_typed_errors(code: int, domain: int, kind: Any, words: str) -> None:
    error = translate(LIBVIRT, FakeError(code, "boom", domain), "doing it", "vm1")
    assert type(error) is kind and words in str(error) and "doing it (vm1): boom" in str(error)
    assert isinstance(error, SandboxError)


def test_a_failed_start_is_a_start_error_with_a_hint_for_file_access() -> None:
    e = FakeError(1, "Could not open '/x/root.qcow2': Permission denied")
    error = start_error(translate(LIBVIRT, e, "starting the VM"), e)
    assert isinstance(error, SandboxStartError) and "NIXOS_EPHEMERAL_VM_IMAGES_DIR" in str(error)
    gone = FakeError(42, "no domain")
    assert type(start_error(translate(LIBVIRT, gone, "starting"), gone)) is SandboxNotFound
