"""What a kernel pod's status says: running, never going to start (and why), unschedulable."""

from __future__ import annotations

from typing import Any

# Container waiting reasons that never resolve by themselves: fail the launch at once.
FATAL_WAITING = {"ErrImageNeverPull", "InvalidImageName", "ErrImagePull", "ImagePullBackOff",
                 "CreateContainerConfigError", "CreateContainerError", "CrashLoopBackOff",
                 "RunContainerError", "ImageInspectError"}


def container_status(pod: Any) -> Any | None:
    """The kernel container's status in ``pod`` (None before it has one)."""
    for status in pod.status.container_statuses or []:
        if status.name == "kernel":
            return status
    return None


def container_running(pod: Any) -> bool:
    """Whether the pod runs and its kernel container with it."""
    status = container_status(pod)
    return bool(pod.status.phase == "Running" and status is not None and status.state.running)


def start_problem(pod: Any) -> str:
    """Why a pod will not start by itself ('' while it may still start); the container's
    own state says most, so it comes first."""
    status = container_status(pod)
    if status is not None and status.state.waiting and status.state.waiting.reason in FATAL_WAITING:
        waiting = status.state.waiting
        return f"{waiting.reason}: {waiting.message or ''}".strip()
    if status is not None and status.state.terminated:
        term = status.state.terminated
        return f"the container exited ({term.reason}, code {term.exit_code}): {term.message or ''}".strip()
    if pod.status.phase in ("Failed", "Succeeded"):
        detail = " ".join(x for x in (pod.status.reason, pod.status.message) if x)
        return f"phase {pod.status.phase}{': ' + detail if detail else ''}"
    return ""


def unschedulable(pod: Any) -> str:
    """The scheduler's reason while the pod cannot be placed ('' otherwise)."""
    for condition in pod.status.conditions or []:
        if condition.type == "PodScheduled" and condition.status == "False" and condition.reason == "Unschedulable":
            return f"{condition.reason}: {condition.message}"
    return ""


def pending_detail(pod: Any) -> str:
    """What a pod that does not run yet waits for, for the start progress ('' when nothing
    is said): the scheduler's reason, else the container's waiting reason."""
    reason = unschedulable(pod)
    if reason:
        return reason
    status = container_status(pod)
    if status is not None and status.state.waiting and status.state.waiting.reason:
        return str(status.state.waiting.reason)
    return ""
