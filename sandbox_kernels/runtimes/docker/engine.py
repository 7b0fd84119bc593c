"""A small, typed wrapper around docker-py: the one place where Docker errors are translated.

Every method blocks; provisioners call them through ``asyncio.to_thread``.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, TypeVar

from ...errors import SandboxConfigError, SandboxError, SandboxNotFound, SandboxUnavailable
from ...labels import KERNEL_ID
from ..registry import require

_HOW_TO_START = (
    "Start the Docker engine (as root: `dockerd > /var/log/dockerd.log 2>&1 &`, or run "
    "`make demo`, which installs and starts it), or point DOCKER_HOST at a running engine."
)


_F = TypeVar("_F", bound=Callable[..., Any])


def _engine_call(method: _F) -> _F:
    """Turn "the engine went away" (a refused or reset socket) into SandboxUnavailable."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import requests

        try:
            return method(*args, **kwargs)
        except requests.exceptions.ConnectionError as e:
            raise SandboxUnavailable(f"lost the Docker engine: {e}. {_HOW_TO_START}") from e

    return wrapper  # type: ignore[return-value]


class DockerEngine:
    """The Docker engine, reached through docker-py's low-level and container APIs."""

    def __init__(self, timeout: float = 30.0) -> None:
        docker = require("docker", "docker")
        try:
            self._client = docker.from_env(timeout=int(timeout))
            self._client.ping()
        except Exception as e:  # docker-py raises DockerException or requests errors here
            where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
            raise SandboxUnavailable(
                f"the Docker engine is not reachable at {where}: {e}. {_HOW_TO_START}"
            ) from e
        self._errors = docker.errors

    @property
    def client(self) -> Any:
        """The docker-py client (for the image builder and the snapshot service)."""
        return self._client

    @_engine_call
    def check_image(self, image: str) -> str:
        """Raise a clear error if ``image`` is not present locally (we never pull); returns
        its id.

        Raises:
            SandboxConfigError: the image is not in the local engine.
        """
        try:
            return str(self._client.images.get(image).id)
        except self._errors.ImageNotFound as e:
            raise SandboxConfigError(
                f"image={image!r}: no such image in the local Docker engine. Build the default "
                f"one with `sandbox-kernels image build docker`, or set 'image' in the "
                f"kernelspec config (or SANDBOX_DOCKER_IMAGE) to an image that has python3 "
                f"and ipykernel."
            ) from e
        except self._errors.APIError as e:
            raise SandboxError(f"Docker could not inspect image {image!r}: {e.explanation}") from e

    @_engine_call
    def create(self, **spec: Any) -> str:
        """Create (not start) a container from keyword arguments of ``containers.create``.

        Returns:
            The container id.

        Raises:
            SandboxConfigError: Docker refused the container spec (bad limit, network, ...).
        """
        try:
            return str(self._client.containers.create(**spec).id)
        except self._errors.ImageNotFound as e:
            raise SandboxConfigError(f"image={spec.get('image')!r} not found: {e}") from e
        except self._errors.APIError as e:
            raise SandboxConfigError(f"Docker refused to create the container: {e.explanation}") from e

    @_engine_call
    def start(self, container_id: str) -> None:
        """Start a created or exited container.

        Raises:
            SandboxNotFound: the container no longer exists.
            SandboxError: Docker failed to start it.
        """
        try:
            self._client.api.start(container_id)
        except self._errors.NotFound as e:
            raise SandboxNotFound(f"container {container_id[:12]} is gone") from e
        except self._errors.APIError as e:
            raise SandboxError(f"Docker could not start the container: {e.explanation}") from e

    @_engine_call
    def state(self, container_id: str) -> dict[str, Any] | None:
        """The container's ``State`` block, or None when it does not exist."""
        try:
            return dict(self._client.api.inspect_container(container_id)["State"])
        except self._errors.NotFound:
            return None
        except self._errors.APIError as e:
            raise SandboxError(f"Docker could not inspect the container: {e.explanation}") from e

    @_engine_call
    def kill(self, container_id: str, signum: int) -> None:
        """Send ``signum`` to the container's init, which forwards it to the kernel."""
        try:
            self._client.api.kill(container_id, signal=signum)
        except self._errors.NotFound:
            return
        except self._errors.APIError as e:
            if e.status_code == 409:  # not running
                return
            raise SandboxError(f"Docker could not signal the container: {e.explanation}") from e

    @_engine_call
    def wait_stopped(self, container_id: str, timeout: float) -> None:
        """Wait for the container to stop (bounded); missing counts as stopped."""
        try:
            self._client.api.wait(container_id, timeout=int(max(1, timeout)))
        except self._errors.NotFound:
            return
        except Exception as e:  # a read timeout from requests, or an API error
            raise SandboxError(f"container {container_id[:12]} did not stop: {e}") from e

    @_engine_call
    def logs(self, container_id: str, tail: int = 30, max_bytes: int = 16 * 1024) -> str:
        """The last ``tail`` lines of the container's output, at most ``max_bytes`` of them.

        The output is the kernel's, so hostile: one line can be gigabytes. It is streamed
        and read no further than ``max_bytes``; the end of what was read is kept.
        """
        chunks: list[bytes] = []
        size = 0
        try:
            stream = self._client.api.logs(container_id, tail=tail, stream=True, follow=False)
            try:
                for chunk in stream:
                    chunks.append(chunk)
                    size += len(chunk)
                    if size >= max_bytes:
                        break
            finally:
                close = getattr(stream, "close", None)
                if close is not None:
                    close()
        except self._errors.APIError:
            return ""
        raw = b"".join(chunks)
        text = raw[-max_bytes:].decode(errors="replace")
        return text if len(raw) <= max_bytes else f"[output cut to its last {max_bytes} bytes]\n{text}"

    @_engine_call
    def remove(self, container_id: str) -> None:
        """Force-remove a container; a missing one is fine."""
        try:
            self._client.api.remove_container(container_id, force=True, v=True)
        except self._errors.NotFound:
            return
        except self._errors.APIError as e:
            if e.status_code == 409 and "already in progress" in str(e.explanation):
                return
            raise SandboxError(f"Docker could not remove the container: {e.explanation}") from e

    @_engine_call
    def find(self, kernel_id: str | None = None) -> list[dict[str, Any]]:
        """Containers labelled as ours (optionally for one kernel), as ``docker ps`` rows."""
        label = KERNEL_ID if kernel_id is None else f"{KERNEL_ID}={kernel_id}"
        rows = self._client.api.containers(all=True, filters={"label": label})
        return [dict(row) for row in rows]

    @_engine_call
    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._client.close()

    # -- snapshot images -----------------------------------------------------------------------

    @_engine_call
    def pause(self, container_id: str, paused: bool) -> None:
        """Freeze (``paused=True``) or thaw the container's processes; a stopped one is fine.

        Raises:
            SandboxNotFound: the container no longer exists.
        """
        try:
            if paused:
                self._client.api.pause(container_id)
            else:
                self._client.api.unpause(container_id)
        except self._errors.NotFound as e:
            raise SandboxNotFound(f"container {container_id[:12]} is gone") from e
        except self._errors.APIError as e:
            if e.status_code == 409 or "is not paused" in str(e.explanation):  # not running,
                return  # or already (un)paused
            raise SandboxError(f"Docker could not (un)pause the container: {e.explanation}") from e

    @_engine_call
    def rw_size(self, container_id: str) -> int:
        """Bytes in the container's writable layer (apparent sizes: a sparse file counts whole,
        as ``docker commit`` would write it).

        Raises:
            SandboxNotFound: the container no longer exists.
        """
        try:
            rows = self._client.api.containers(all=True, size=True, filters={"id": container_id})
        except self._errors.APIError as e:
            raise SandboxError(f"Docker could not size the container: {e.explanation}") from e
        if not rows:
            raise SandboxNotFound(f"container {container_id[:12]} is gone")
        return int(rows[0].get("SizeRw") or 0)

    @_engine_call
    def commit(self, container_id: str, repository: str, tag: str, labels: dict[str, str],
               pause: bool = True) -> int:
        """Commit the container's filesystem to ``repository:tag`` with ``labels``.

        Returns:
            The image size in bytes.
        """
        changes = [f'LABEL "{k}"="{v}"' for k, v in labels.items()]
        try:
            result = self._client.api.commit(container_id, repository=repository, tag=tag,
                                             changes=changes, pause=pause)
            return int(self._client.api.inspect_image(result["Id"]).get("Size", 0))
        except self._errors.NotFound as e:
            raise SandboxNotFound(f"container {container_id[:12]} is gone: cannot snapshot it") from e
        except self._errors.APIError as e:
            raise SandboxError(f"Docker could not commit the container: {e.explanation}") from e

    @_engine_call
    def image_size(self, ref: str) -> int:
        """The size in bytes of image ``ref`` (its layers and its parents').

        Raises:
            SandboxNotFound: no such image.
        """
        try:
            return int(self._client.api.inspect_image(ref).get("Size", 0))
        except self._errors.NotFound as e:
            raise SandboxNotFound(f"image {ref} is gone") from e
        except self._errors.APIError as e:
            raise SandboxError(f"Docker could not inspect image {ref}: {e.explanation}") from e

    @_engine_call
    def images(self, label: str) -> list[dict[str, Any]]:
        """Images carrying ``label`` (``key`` or ``key=value``)."""
        return [dict(i) for i in self._client.api.images(filters={"label": label})]

    @_engine_call
    def remove_image(self, ref: str) -> None:
        """Remove an image; a missing one is fine."""
        try:
            self._client.api.remove_image(ref, force=True)
        except self._errors.NotFound:
            return
        except self._errors.APIError as e:
            raise SandboxError(f"Docker could not remove image {ref}: {e.explanation}") from e


def container_memory(container_id: str) -> int:
    """Bytes of memory container ``container_id`` uses, from its cgroup (v2 ``memory.current``
    or v1 ``memory.usage_in_bytes``, cgroupfs or systemd driver); 0 if none is found. Kernel
    files: nothing the container writes."""
    candidates = []
    for parent in ("docker/{}", "system.slice/docker-{}.scope"):
        rel = parent.format(container_id)
        candidates += [f"/sys/fs/cgroup/{rel}/memory.current",
                       f"/sys/fs/cgroup/memory/{rel}/memory.usage_in_bytes"]
    for path in candidates:
        try:
            with open(path, "rb") as f:
                return int(f.read(64))
        except (OSError, ValueError):
            continue
    return 0
