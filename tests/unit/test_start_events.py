"""Start phases as Jupyter server events: the schema, the sink, and the extension's wiring."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import pytest
import yaml
from jupyter_events import EventLogger
from jupyter_events.schema import EventSchema
from jsonschema import ValidationError

from jupyter_server_ext.events import FIELDS, SCHEMA_ID, SCHEMA_PATH, StartEventSink
from sandbox_kernels.provisioning.start_progress import PHASES, StartProgress

LOG = logging.getLogger("test-start-events")


class Received:
    """A jupyter_events listener that keeps what it receives and says when it got some."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.arrived = asyncio.Event()

    async def __call__(self, logger: EventLogger, schema_id: str, data: dict[str, Any]) -> None:
        assert schema_id == SCHEMA_ID
        self.events.append(dict(data))
        self.arrived.set()

    async def wait(self, count: int) -> list[dict[str, Any]]:
        while len(self.events) < count:
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), 10)
        return self.events


@pytest.fixture
def logger() -> EventLogger:
    return EventLogger()


def test_the_schema_names_every_phase_and_field() -> None:
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    assert schema["$id"] == SCHEMA_ID
    assert tuple(schema["properties"]["phase"]["enum"]) == PHASES
    assert tuple(schema["properties"]) == FIELDS
    EventSchema(SCHEMA_PATH)  # a valid jupyter_events schema


async def test_each_phase_is_emitted_and_valid(logger: EventLogger) -> None:
    sink = StartEventSink(logger, LOG)
    received = Received()
    sink.install()
    logger.add_listener(schema_id=SCHEMA_ID, listener=received)
    try:
        progress = StartProgress("k-1", "sandbox-nixos-vm", "libvirt", LOG)
        progress.phase("queued", "waiting for a VM slot", queue_position=2)
        progress.phase("restoring", "restoring the VM")
        progress.phase("failed", "memory='1k' is too small")
        events = await received.wait(3)
    finally:
        sink.uninstall()
    assert [e["phase"] for e in events] == ["queued", "restoring", "failed"]
    assert events[0]["queue_position"] == 2 and events[1]["queue_position"] is None
    assert events[2]["message"] == "memory='1k' is too small"
    for event in events:
        assert set(event) == set(FIELDS)
        assert event["kernel_id"] == "k-1" and event["runtime"] == "libvirt"
        logger.schemas.validate_event(SCHEMA_ID, event)
    # Once removed, the sink hears nothing more.
    StartProgress("k-2", "sandbox-docker", "docker", LOG).phase("creating", "creating")
    await asyncio.sleep(0)
    assert len(received.events) == 3


@pytest.mark.parametrize("bad", [
    {"phase": "warming"}, {"queue_position": 0}, {"elapsed": -1}, {"extra": 1},
])
def test_the_schema_refuses_malformed_events(logger: EventLogger, bad: dict[str, Any]) -> None:
    logger.register_event_schema(SCHEMA_PATH)
    event = {"kernel_id": "k", "kernel_name": "n", "runtime": "docker", "phase": "ready",
             "message": "ready", "elapsed": 1.0, "queue_position": None, **bad}
    with pytest.raises(ValidationError):
        logger.schemas.validate_event(SCHEMA_ID, event)


async def test_a_phase_from_another_thread_is_emitted_on_the_loop(logger: EventLogger) -> None:
    sink = StartEventSink(logger, LOG)
    received = Received()
    sink.install()
    logger.add_listener(schema_id=SCHEMA_ID, listener=received)
    try:
        progress = StartProgress("k-3", "sandbox-docker", "docker", LOG)
        thread = threading.Thread(target=progress.phase, args=("creating", "creating the container"))
        thread.start()
        await asyncio.to_thread(thread.join)
        events = await received.wait(1)
    finally:
        sink.uninstall()
    assert events[0]["phase"] == "creating"


def test_a_failing_logger_never_fails_the_start(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(EventLogger):
        def emit(self, **kwargs: Any) -> None:  # type: ignore[override]
            raise RuntimeError("broken")

    sink = StartEventSink(Broken(), LOG)
    sink.install()
    try:
        StartProgress("k-4", "sandbox-docker", "docker", LOG).phase("ready", "ready")
    finally:
        sink.uninstall()
    assert "could not emit start phase ready" in caplog.text


@pytest.fixture
def jp_server_config() -> dict[str, object]:
    return {"ServerApp": {"jpserver_extensions": {"jupyter_server_ext": True}},
            "SandboxKernelsExtension": {"reap_on_start": False}}


async def test_the_server_extension_emits_phases_until_it_stops(jp_serverapp: Any) -> None:
    received = Received()
    jp_serverapp.event_logger.add_listener(schema_id=SCHEMA_ID, listener=received)
    assert SCHEMA_ID in jp_serverapp.event_logger.schemas.schema_ids
    StartProgress("k-5", "sandbox-docker", "docker", LOG).phase("starting", "starting the kernel")
    events = await received.wait(1)
    assert events[0]["kernel_id"] == "k-5" and events[0]["phase"] == "starting"
    await jp_serverapp.extension_manager.stop_all_extensions()
    StartProgress("k-6", "sandbox-docker", "docker", LOG).phase("ready", "ready")
    await asyncio.sleep(0)
    assert len(received.events) == 1
