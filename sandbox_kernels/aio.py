"""Blocking calls off the event loop, and a way to still run them at interpreter exit.

At exit, ``concurrent.futures`` refuses new work ("cannot schedule new futures after
interpreter shutdown"), yet the last-resort clean-up must still remove sandboxes. After
:func:`exiting` is called, :func:`to_thread` runs the call inline instead.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, TypeVar

T = TypeVar("T")
_exiting = False


def exiting() -> None:
    """Switch to inline calls (called from the at-exit clean-up only)."""
    global _exiting
    _exiting = True


async def to_thread(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``asyncio.to_thread``, or an inline call once the interpreter is exiting."""
    if _exiting:
        return fn(*args, **kwargs)
    return await asyncio.to_thread(fn, *args, **kwargs)
