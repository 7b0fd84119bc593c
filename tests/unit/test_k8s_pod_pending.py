"""What a pending kernel pod waits for, as the start progress shows it."""

from __future__ import annotations

from types import SimpleNamespace as NS

from sandbox_kernels.runtimes.k8s.pod_status import pending_detail


def pod(phase: str = "Pending", waiting: str | None = None, unschedulable: str | None = None) -> NS:
    statuses = [NS(name="kernel", state=NS(waiting=NS(reason=waiting, message=""), running=None,
                                           terminated=None))] if waiting else []
    conditions = [NS(type="PodScheduled", status="False", reason="Unschedulable",
                     message=unschedulable)] if unschedulable else []
    return NS(status=NS(phase=phase, container_statuses=statuses, conditions=conditions))


def test_the_schedulers_reason_comes_first_then_the_containers() -> None:
    assert pending_detail(pod(unschedulable="0/1 nodes: Insufficient memory")) == \
        "Unschedulable: 0/1 nodes: Insufficient memory"
    assert pending_detail(pod(waiting="ContainerCreating")) == "ContainerCreating"
    assert pending_detail(pod()) == ""
