"""One table of optional C accelerators, keyed by (the update they replace, the codec).

An accelerator is a Python callable ``(opt, s, flags, run, start, step) -> bool`` that performs the update
on a run's buffers and returns True, or returns False where it cannot serve (not the CPU, a gradient that is
not contiguous, no C compiler); the codec's torch-op path then runs, with the same numbers. Looking an
accelerator up by the update function itself (not by which state keys a run happens to hold) means an
optimizer that registers none — Lion, or a user's own — always gets the torch-op path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

CODECS = ("bf16", "8bit")

_TABLE: dict[tuple[Callable[..., Any], str], Callable[..., bool]] = {}


def register_accelerator(update: Callable[..., Any], codec: str, fn: Callable[..., bool]) -> None:
    """Register ``fn`` as the accelerator of ``update`` (an optimizer's ``_fused_update``) under ``codec``."""
    if codec not in CODECS:
        raise ValueError(f"register_accelerator: codec must be one of {CODECS} (got {codec!r})")
    key = (update, codec)
    if key in _TABLE and _TABLE[key] is not fn:
        raise ValueError(f"register_accelerator: {update.__qualname__} already has a {codec} accelerator "
                         f"({_TABLE[key].__qualname__})")
    _TABLE[key] = fn


def accelerator(update: Callable[..., Any], codec: str) -> Callable[..., bool] | None:
    """The accelerator registered for ``update`` under ``codec``, or None."""
    return _TABLE.get((update, codec))
