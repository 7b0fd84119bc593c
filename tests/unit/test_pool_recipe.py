"""What a warm pool is keyed by, its wire format, and who owns a pooled sandbox (no engine)."""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.kernelspec import KernelSpec

from helpers.fakes import FakeRuntime, FakeWorld
from sandbox_kernels import labels
from sandbox_kernels.errors import SandboxConfigError, SandboxConnectionError
from sandbox_kernels.pool import protocol
from sandbox_kernels.pool.recipe import Recipe, recipe_for


def _recipe(**changes: Any) -> Recipe:
    recipe = Recipe(
        provisioner_class="sandbox_kernels.runtimes.docker.provisioner:DockerProvisioner",
        kernel_name="sandbox-docker",
        spec={"argv": ["python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
              "env": {"A": "1"}, "display_name": "Docker", "language": "python", "metadata": {},
              "interrupt_mode": "signal"},
        settings={"memory": "1g", "pool_size": 2, "pool_idle_timeout": 600.0},
        env={"PYTHONUNBUFFERED": "1"}, identity={"image_id": "sha256:aaa"}, runtime="docker")
    for path, value in changes.items():
        part, _, name = path.partition("__")
        getattr(recipe, part)[name] = value
    return recipe


@pytest.mark.parametrize("change", [
    {"settings__memory": "2g"},
    {"identity__image_id": "sha256:bbb"},
    {"spec__env": {"A": "2"}},
    {"env__EXTRA": "x"},
])
def test_recipe_key_changes_with_what_makes_a_sandbox_different(change: dict[str, Any]) -> None:
    assert _recipe(**change).key() != _recipe().key()


@pytest.mark.parametrize("change", [
    {"settings__pool_size": 5},
    {"settings__pool_idle_timeout": 3.0},
])
def test_recipe_key_ignores_the_pool_size_and_idle_time(change: dict[str, Any]) -> None:
    assert _recipe(**change).key() == _recipe().key()


def test_recipe_round_trips_and_rejects_what_is_not_one() -> None:
    recipe = _recipe()
    again = Recipe.from_dict(copy.deepcopy(recipe.to_dict()))
    assert again == recipe and again.key() == recipe.key()
    assert (again.target, again.idle_timeout) == (2, 600.0)
    with pytest.raises(SandboxConfigError, match="not a pool recipe"):
        Recipe.from_dict({**recipe.to_dict(), "colour": "blue"})


async def test_recipe_leaves_the_per_session_name_out(world: FakeWorld) -> None:
    spec = KernelSpec(argv=["python3", "-f", "{connection_file}"], env={"SPEC_VARIABLE": "s"},
                      display_name="Fake", language="python", metadata={})
    prov = FakeRuntime(kernel_id="k-1", kernel_spec=spec, parent=None)
    prov.world = world
    one = await recipe_for(prov, "fake-sandbox", {"JPY_SESSION_NAME": "/a.ipynb", "SECRET": "host"})
    other = await recipe_for(prov, "fake-sandbox", {"JPY_SESSION_NAME": "/b.ipynb"})
    assert "JPY_SESSION_NAME" not in one.env and "SECRET" not in one.env
    assert one.spec["env"] == {"SPEC_VARIABLE": "s"}
    assert one.key() == other.key(), "two notebooks of one kernelspec must share a pool"
    assert one.runtime == "fake" and one.provisioner_class.endswith(":FakeRuntime")


# -- protocol ------------------------------------------------------------------------------


def test_a_message_and_its_descriptor_cross_a_socketpair() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()
    try:
        protocol.send(left, {"op": "claim", "n": [1, 2]}, [r])
        message, fds = protocol.receive(right)
        assert message == {"op": "claim", "n": [1, 2]}
        assert len(fds) == 1 and fds[0] != r
        os.write(w, b"through the passed descriptor")
        assert os.read(fds[0], 100) == b"through the passed descriptor"
        protocol.close_fds(fds)
        protocol.send(left, {"big": "x" * 200_000})  # more than one read
        assert protocol.receive(right)[0]["big"] == "x" * 200_000
    finally:
        for fd in (r, w):
            os.close(fd)
        left.close()
        right.close()


@pytest.mark.parametrize("payload, error", [
    (b"not json\n", "malformed"),
    (b"[1, 2]\n", "not an object"),
    (b"{\"half\": ", "closed the connection"),
])
def test_malformed_messages_are_refused(payload: bytes, error: str) -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        left.sendall(payload)
        left.shutdown(socket.SHUT_WR)
        with pytest.raises(SandboxConnectionError, match=error):
            protocol.receive(right)
    finally:
        left.close()
        right.close()


def test_oversize_messages_are_refused_both_ways() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    right.settimeout(30)
    try:
        with pytest.raises(SandboxConnectionError, match="too large"):
            protocol.send(left, {"big": "x" * protocol.MAX_MESSAGE})
        r, w = os.pipe()
        os.close(w)
        # A peer that streams more than MAX_MESSAGE without a newline (with a descriptor on
        # the way): refused once past the limit, and the descriptor received is closed.
        import threading

        def flood() -> None:
            socket.send_fds(left, [b"y" * 1000], [r])
            chunk = b"y" * 65536
            try:
                for _ in range(protocol.MAX_MESSAGE // len(chunk) + 2):
                    left.sendall(chunk)
            except OSError:
                pass

        before = set(os.listdir("/proc/self/fd"))
        thread = threading.Thread(target=flood)
        thread.start()
        with pytest.raises(SandboxConnectionError, match="too large"):
            protocol.receive(right)
        right.close()
        thread.join(30)
        os.close(r)
        assert set(os.listdir("/proc/self/fd")) <= before, "a received descriptor was left open"
    finally:
        left.close()
        right.close()


# -- who owns a pooled sandbox -------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_claimed_sandbox_belongs_to_its_claimer(tmp_path: Path) -> None:
    member = "0f0e0d0c-0000-4000-8000-000000000001"
    pooled = {**labels.owner_labels(member, "docker", pooled=True)}  # owner: this (live) process
    assert pooled[labels.POOLED] == "1" and labels.owner_alive(pooled, str(tmp_path))
    state_dir = tmp_path / member
    state_dir.mkdir()
    (state_dir / labels.CLAIMED_BY).write_text(f"{_dead_pid()}\n")
    assert not labels.owner_alive(pooled, str(tmp_path)), "the claimer died: the sandbox is an orphan"
    (state_dir / labels.CLAIMED_BY).write_text(f"{os.getpid()}\n")
    dead_agent = {**pooled, labels.OWNER_PID: str(_dead_pid())}
    assert labels.owner_alive(dead_agent, str(tmp_path)), "a live claimer owns it, whatever the agent"
    (state_dir / labels.CLAIMED_BY).unlink()
    assert not labels.owner_alive(dead_agent, str(tmp_path)), "unclaimed: the (dead) agent owns it"
    # Only a pooled sandbox looks at a claim file: an ordinary one belongs to its labelled owner.
    (state_dir / labels.CLAIMED_BY).write_text(f"{os.getpid()}\n")
    plain = {**labels.owner_labels(member, "docker"), labels.OWNER_PID: str(_dead_pid())}
    assert labels.POOLED not in plain and not labels.owner_alive(plain, str(tmp_path))
    assert labels.claimed_by(str(state_dir)) == os.getpid()
    (state_dir / labels.CLAIMED_BY).write_text("garbage")
    assert labels.claimed_by(str(state_dir)) is None


def test_a_pooled_sandbox_is_judged_by_its_own_state_root(tmp_path: Path) -> None:
    """`reap` run with another state root (a shell's default, another server's) finds the claim
    where the pool's agent recorded it."""
    member = "0f0e0d0c-0000-4000-8000-000000000002"
    own, other = tmp_path / "own", tmp_path / "other"
    (own / member).mkdir(parents=True)
    other.mkdir()
    (own / member / labels.CLAIMED_BY).write_text(f"{os.getpid()}\n")
    pooled = {**labels.owner_labels(member, "docker", pooled=True, state_root=str(own)),
              labels.OWNER_PID: str(_dead_pid())}  # its agent has exited; its claimer runs
    assert pooled[labels.STATE_ROOT] == str(own)
    assert labels.owner_alive(pooled, str(other)), "a live claimed kernel judged from another root"
    (own / member / labels.CLAIMED_BY).write_text(f"{_dead_pid()}\n")
    assert not labels.owner_alive(pooled, str(other))
    assert labels.STATE_ROOT not in labels.owner_labels(member, "docker", state_root=str(own))
