"""The step loop, for both kinds of bucket: a flat bucket (``step_flat``: runs of parameters, one update call
each, gradients read where they lie in calls of their own) and a bucket of DTensor shards (``step_sharded``:
small shards packed into one call, the others updated in place). Both end in the optimizer's ``_apply``, which
the precision mixins refine; state made by a step is exposed in torch's layout (``state.expose_state``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .dtensor import ShardedBucket, local_grads
from .grads import gather_grads
from .layout import Bucket, runs, scalars_tensor
from .state import expose_state

if TYPE_CHECKING:
    from .optimizer import FusedOptimizer


def step_flat(self: FusedOptimizer, bucket: Bucket) -> None:
    """``FusedOptimizer.step`` for a flat bucket (``self``: the optimizer): one call per run of parameters that
    have gradients and share a step count (the whole bucket, usually)."""
    present, direct = gather_grads(bucket, type(self).__name__)
    if present is not None and not any(present):
        return
    group = self.param_groups[bucket.group_index]
    init = self._bucket_init(bucket, group)
    flags = self._flags(group)
    stateless = not init and not self._step_in_state  # SGD without momentum: torch keeps no state
    common = bucket.common_step
    if present is None and common is not None:
        # the usual step: every parameter has a gradient and they share a step count
        update_run(self, bucket, group, init, flags, 0, len(bucket.params), direct, common + 1)
        if stateless:
            return
        if self._step_in_state:
            bucket.steps.add_(1)
        if common == 0:
            expose_state(self, bucket, 0, len(bucket.params), init)
        bucket.common_step = common + 1
        return
    bucket.ensure_state(init)
    if common is not None:
        bucket.host_steps = [common] * len(bucket.params)
    steps = bucket.host_steps
    for start, end in runs(present, bucket.run_keys(self._host_state)):
        new_step = steps[start] + 1
        update_run(self, bucket, group, init, flags, start, end, direct, new_step)
        if self._step_in_state:
            bucket.steps[start:end].add_(1)
        if stateless:
            continue
        if steps[start] == 0:
            expose_state(self, bucket, start, end, init)
        steps[start:end] = [new_step] * (end - start)
    bucket.refresh_common_step()

def update_run(self: FusedOptimizer, bucket: Bucket, group: dict[str, Any], init: dict[str, float], flags: tuple,
                start: int, end: int, direct: dict[int, torch.Tensor] | None, step: int) -> None:
    """Update parameters ``start:end`` of the bucket (all with gradients, all at the same step): one call
    on the buffers' slices, except that each parameter in ``direct`` gets a call of its own that reads
    its gradient where it lies."""
    s = run_scalars(self, bucket, group, start, end, step)
    hp = scalars_tensor(s, bucket.flat_param) if self._fused else None
    bucket.current_step = step  # for an update that needs the count itself (bfloat16 state's rounding)
    i0 = start
    for i in (direct or ()):  # ascending: gather_grads fills it in index order
        if i < start or i >= end:
            continue
        if bucket.span(i0, i):
            self._apply(s, hp, flags, bucket.slices(init, i0, i), bucket)
        self._apply(s, hp, flags, {**bucket.slices(init, i, i + 1, grad=False), "grad": direct[i]}, bucket)
        i0 = i + 1
    if bucket.span(i0, end):
        self._apply(s, hp, flags, bucket.slices(init, i0, end), bucket)


def run_scalars(self: FusedOptimizer, bucket: Any, group: dict[str, Any], start: int, end: int, step: int) -> Any:
    """The update's scalars for parameters ``start:end`` at ``step``; an optimizer with per-parameter scalar
    state (``_host_state``: NAdam's ``mu_product``) first advances it for them, and its scalars read it (the
    run's parameters share its value: ``Bucket.run_keys``)."""
    if not self._host_state:
        return self._scalars(group, step)
    views = {k: t[start:end] for k, t in bucket.host_values(self._host_state).items()}
    self._advance_host_state(group, step, views)
    return self._scalars(group, step, {k: float(v[0]) for k, v in views.items()})


def step_sharded(self: FusedOptimizer, bucket: ShardedBucket) -> None:
    """``FusedOptimizer.step`` for a ShardedBucket (``self``: the optimizer): small shards packed into one call,
    the others updated where they lie, one call each."""
    grads = local_grads(bucket, type(self).__name__)
    if all(g is None for g in grads):
        return
    group = self.param_groups[bucket.group_index]
    init, flags = self._state_init(group), self._flags(group)
    stateless = not init and not self._step_in_state
    bucket.ensure_state(init)
    if bucket.common_step is not None:
        bucket.host_steps = [bucket.common_step] * len(bucket.params)
    steps = bucket.host_steps
    k = bucket.n_small
    keys = bucket.run_keys(self._host_state)
    packed = k > 1 and all(g is not None for g in grads[:k]) and keys[:k].count(keys[0]) == k
    if packed:  # the small shards: in, one call, out
        flat_p, flat_g, p_views, g_views = bucket.packed_buffers()
        torch._foreach_copy_(p_views, bucket.local_flat[:k])
        torch._foreach_copy_(g_views, grads[:k])
        s = run_scalars(self, bucket, group, 0, k, steps[0] + 1)
        hp = scalars_tensor(s, flat_p) if self._fused else None
        self._apply(s, hp, flags, {"param": flat_p, "grad": flat_g,
                                   **{key: bucket.flat_state[key][:bucket.small_total] for key in init}}, bucket)
        torch._foreach_copy_(bucket.local_flat[:k], p_views)
    for i, g in enumerate(grads):
        if g is None:
            continue
        new_step = steps[i] + 1
        if not (packed and i < k) and self._host_state and not bucket.numels[i]:
            run_scalars(self, bucket, group, i, i + 1, new_step)  # an empty shard's scalar state still advances
        if bucket.numels[i] and not (packed and i < k):
            s = run_scalars(self, bucket, group, i, i + 1, new_step)
            hp = scalars_tensor(s, bucket.locals[i]) if self._fused else None
            run = {"param": bucket.local_flat[i], "grad": g,
                   **{k: bucket.local_state(k, i) for k in init}}
            self._apply(s, hp, flags, run, bucket)
        if self._step_in_state:
            bucket.steps[i].add_(1)
        if stateless:
            continue
        if steps[i] == 0:
            expose_state(self, bucket, i, i + 1, init)
        steps[i] = new_step
    bucket.refresh_common_step()
