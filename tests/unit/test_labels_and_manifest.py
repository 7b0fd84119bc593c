"""Labels that mark what we create (and how reap tells a live owner from a dead one), and the
pod manifest's optional parts. Pure functions; no engine."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from sandbox_kernels.labels import KERNEL_ID, OWNER_HOST, OWNER_PID, RUNTIME, SESSION, owner_alive, owner_labels
from sandbox_kernels.runtimes.k8s.manifest import INIT_SCRIPT, k8s_labels, pod_manifest


def test_owner_labels_name_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SANDBOX_KERNELS_SESSION", raising=False)
    labels = owner_labels("k1", "docker")
    assert labels == {KERNEL_ID: "k1", RUNTIME: "docker", OWNER_PID: str(os.getpid()),
                      OWNER_HOST: socket.gethostname()}
    monkeypatch.setenv("SANDBOX_KERNELS_SESSION", "run42")
    assert owner_labels("k1", "docker")[SESSION] == "run42"


def _exited_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.parametrize("labels, alive", [
    ({OWNER_HOST: socket.gethostname(), OWNER_PID: str(os.getpid())}, True),
    ({OWNER_HOST: socket.gethostname(), OWNER_PID: "1"}, True),  # alive, whether ours to signal or not
    ({OWNER_HOST: "another-host", OWNER_PID: "999999999"}, True),  # never judged from here
    ({OWNER_HOST: socket.gethostname(), OWNER_PID: "soon"}, False),
    ({OWNER_HOST: socket.gethostname(), OWNER_PID: "0"}, False),
    ({OWNER_HOST: socket.gethostname()}, False),
])
def test_owner_alive(labels: dict[str, str], alive: bool) -> None:
    assert owner_alive(labels) is alive


def test_a_dead_owner_is_not_alive() -> None:
    assert owner_alive({OWNER_HOST: socket.gethostname(), OWNER_PID: str(_exited_pid())}) is False


def test_k8s_labels_use_a_slash_and_legal_values() -> None:
    labels = k8s_labels({KERNEL_ID: "k1", OWNER_HOST: "host name/with:odd chars", "other": "-x" + "y" * 80})
    assert labels["sandbox-kernels/kernel-id"] == "k1"
    assert labels["sandbox-kernels/owner-host"] == "host-name-with-odd-chars"
    assert labels["other"] == ("x" + "y" * 80)[:62], "at most 63 characters, no leading dash"
    assert all(len(v) <= 63 for v in labels.values())


def _pod(**overrides: object) -> dict:  # type: ignore[type-arg]
    args = dict(name="sandbox-kernels-k1", labels={"sandbox-kernels/kernel-id": "k1"}, image="img",
                image_pull_policy="Never", python="python3", resources={"requests": {}, "limits": {}},
                node_selector={}, tolerations=[], service_account="", automount_token=False,
                seccomp=False)
    args.update(overrides)
    return pod_manifest(**args)  # type: ignore[arg-type]


def test_pod_optional_parts_appear_only_when_set() -> None:
    bare = _pod()["spec"]
    assert not {"nodeSelector", "tolerations", "serviceAccountName"} & set(bare)
    assert "seccompProfile" not in bare["securityContext"]
    assert bare["containers"][0]["resources"] == {}, "empty requests/limits are left out"
    full = _pod(node_selector={"disk": "ssd"}, tolerations=[{"key": "gpu", "operator": "Exists"}],
                service_account="kernels", seccomp=True)["spec"]
    assert full["nodeSelector"] == {"disk": "ssd"}
    assert full["tolerations"] == [{"key": "gpu", "operator": "Exists"}]
    assert full["serviceAccountName"] == "kernels"
    assert full["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}


def test_pod_manifest_copies_what_it_is_given() -> None:
    selector = {"disk": "ssd"}
    pod = _pod(node_selector=selector)
    pod["spec"]["nodeSelector"]["disk"] = "changed"
    assert selector == {"disk": "ssd"}


def _catches_sigterm(pid: int) -> bool:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


def test_pod_init_ends_cleanly_on_sigterm() -> None:
    """PID 1 of the pod, run here: once its handler is in place, SIGTERM ends it with 0."""
    init = subprocess.Popen([sys.executable, "-c", INIT_SCRIPT])
    try:
        deadline = time.monotonic() + 30
        while not _catches_sigterm(init.pid):
            assert init.poll() is None and time.monotonic() < deadline, "init did not start"
            time.sleep(0.05)
        init.send_signal(signal.SIGTERM)
        assert init.wait(timeout=10) == 0
    finally:
        init.kill()
        init.wait()
