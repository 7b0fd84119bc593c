"""Name and size checks: whole-string matches only (a trailing newline is not a name)."""

from __future__ import annotations

import pytest

from sandbox_kernels.errors import SandboxConfigError
from sandbox_kernels.settings import check_env, check_name, parse_size


@pytest.mark.parametrize("value", ["abc\n", "abc\n\n", "-abc", ".abc", "a/b", "a" * 64, "", "a b"])
def test_check_name_refuses(value: str) -> None:
    with pytest.raises(SandboxConfigError, match="kernel id"):
        check_name(value, "kernel id")


def test_check_name_accepts() -> None:
    assert check_name("d40571d7-848a-4d7b-810d-f90b328075c1", "kernel id")


@pytest.mark.parametrize("name", ["PATH\n", "1X", "A-B", ""])
def test_env_names_must_be_identifiers(name: str) -> None:
    with pytest.raises(SandboxConfigError, match="not allowed"):
        check_env({name: "x"})


@pytest.mark.parametrize("value", ["lots", "-5g", "0"])
def test_sizes(value: str) -> None:
    with pytest.raises(SandboxConfigError, match="memory"):
        parse_size(value, "memory")
    assert parse_size("1.5g", "memory") == 1536 * 1024**2
