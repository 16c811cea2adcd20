"""``kernels.warmup``: compile now, blocking, what an optimizer's steps will use.

By default no step waits for a compiler (``_runtime.compile``): updates run eagerly until their compiled kernels,
prepared by a background thread, are ready. A benchmark (or a run that must repeat bit for bit) wants the
compiled kernels from the first step: ``warmup(opt)`` compiles them before it, on a scratch twin of the
optimizer (the same class, options and kinds of buckets, over zero-filled copies of the smallest and the
largest parameter of each device/dtype pair of each group: the memory of those, briefly), and builds or
loads the C kernels of the 8-bit and bfloat16-state paths and of the gradient copy.
"""

from __future__ import annotations

import collections

import torch

from . import native as _native
from .compile import wait_for_background, warming
from .dtensor import is_dtensor
from .optimizer import FusedOptimizer


def warmup(*optimizers: FusedOptimizer, timeout: float | None = None) -> None:
    """Compile, now, the kernels that ``optimizer.step()`` will use, and wait for every compile already handed
    to the background thread (a loss's too); nothing of the optimizers themselves changes.

    >>> opt = kernels.AdamW(model.parameters(), lr=1e-3)
    >>> kernels.warmup(opt)        # the first opt.step() is already compiled

    Raises ``TypeError`` for anything but an optadvisor optimizer and ``TimeoutError`` when background
    compiles are still running after ``timeout`` seconds (they go on; the steps stay eager until done).
    """
    for i, opt in enumerate(optimizers):
        if not isinstance(opt, FusedOptimizer):
            raise TypeError(f"warmup: argument {i} must be an optadvisor optimizer (kernels.Adam, ...), "
                            f"got {type(opt).__name__}")
    for opt in optimizers:
        if opt._fused:
            _native.library()  # the C kernels: built (or loaded from the cache) here, not in the background
            _step_scratch_twin(opt)
    if not wait_for_background(timeout):
        raise TimeoutError(f"warmup: background compiles still running after {timeout} s")


def _representatives(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The smallest and the largest parameter of each (device, dtype, tensor type) of a group: every kind
    of bucket an optimizer makes (8-bit or float state by size, bfloat16 Kahan by dtype, DTensor shards)
    and every kind of run (gradients copied, or read in place when large) has one of them."""
    by_kind: dict[tuple, list[torch.Tensor]] = collections.defaultdict(list)
    for p in params:
        by_kind[(p.device, p.dtype, type(p), is_dtensor(p))].append(p)
    chosen = []
    for same in by_kind.values():
        small = min(same, key=torch.Tensor.numel)
        large = max(same, key=torch.Tensor.numel)
        chosen.extend([small] if small is large else [small, large])
    return chosen


@torch.no_grad()
def _step_scratch_twin(opt: FusedOptimizer) -> None:
    twin = object.__new__(type(opt))
    twin.__dict__.update(opt.__dict__)  # the same options and switches; its own state, groups and buckets
    twin.state = collections.defaultdict(dict)
    twin.param_groups = []
    for group in opt.param_groups:
        params = []
        for p in _representatives(group["params"]):
            q = torch.nn.Parameter(torch.zeros_like(p.detach()), requires_grad=p.requires_grad)
            q.grad = torch.zeros_like(q)
            params.append(q)
        twin.param_groups.append({**group, "params": params})
    twin._rebuild()
    with warming():
        for bucket in twin._buckets:
            twin._step_bucket(bucket)
