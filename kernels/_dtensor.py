"""DTensor parameters (FSDP2's sharded parameters, tensor parallel): updated where their local shards lie.

FSDP2 (``torch.distributed.fsdp.fully_shard``) owns its parameters' storage: each parameter is a DTensor
whose local shard is a view of FSDP's own sharded buffer, which it all-gathers before forward and backward.
So these parameters are *not* re-homed into a flat buffer: each local shard is updated in place, by one
compiled call of its own (the update is elementwise, so a shard's update is the shard of the update), and
the optimizer's state lives in flat buffers over the local shards, exposed in ``optimizer.state`` as
DTensors with the parameter's mesh and placements — torch's format for sharded optimizers, which
``torch.distributed.checkpoint`` saves and loads.

Placements: ``Shard`` and ``Replicate`` are elementwise-safe (every rank updates what it holds); ``Partial``
(a pending reduction) is not, and is refused, as are parameters of one group on different device meshes.
"""

from __future__ import annotations

from typing import Any

import torch

from ._layout import real, scalar_dtype
from ._memory import flat_buffer

try:
    from torch.distributed.tensor import DTensor, Partial
except ImportError:  # pragma: no cover - a torch built without distributed
    DTensor = Partial = None


def is_dtensor(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def check_params(owner: str, group_index: int, params: list[torch.Tensor]) -> None:
    """Refuse what a shard-local elementwise update cannot serve, naming the parameter."""
    meshes = {}
    for i, p in enumerate(params):
        if not is_dtensor(p):
            continue
        where = f"param_groups[{group_index}]['params'][{i}]"
        for placement in p.placements:
            if isinstance(placement, Partial):
                raise ValueError(f"{owner}: {where} is a DTensor with placement {placement!r} (a pending "
                                 "reduction): its local values are not the parameter's, so an elementwise "
                                 "update of them would be wrong; redistribute it to Shard or Replicate first")
        meshes.setdefault(p.device_mesh, where)
    if len(meshes) > 1:
        first, *others = meshes.values()
        raise ValueError(f"{owner}: parameter group {group_index} mixes DTensors on different device meshes "
                         f"({first} and {others[0]}); put each mesh's parameters in a group of its own")


class ShardedBucket:
    """DTensor parameters of one group sharing a device and dtype. Same interface as ``_layout.Bucket`` for
    state and step counts; the update is per parameter, over its local shard."""

    sharded = True

    def __init__(self, group_index: int, group_params: list[torch.Tensor], positions: list[int]):
        self.group_index = group_index
        self.positions = list(positions)
        self.params = [group_params[i] for i in positions]
        self.locals = [p.to_local() for p in self.params]
        for p, t, pos in zip(self.params, self.locals, self.positions):
            if not t.is_contiguous():
                raise ValueError(f"param_groups[{group_index}]['params'][{pos}]: its local shard is not "
                                 "contiguous, so it cannot be updated in place by the fused pass")
        self.numels = [t.numel() for t in self.locals]
        self.offsets, total = [], 0
        for n in self.numels:
            self.offsets.append(total)
            total += n
        self.total = total
        self.device, self.dtype = self.locals[0].device, self.locals[0].dtype
        self.param_ptrs = [t.data_ptr() for t in self.locals]
        self.flat_state: dict[str, torch.Tensor] = {}
        self.steps = torch.zeros(len(self.params), dtype=scalar_dtype())
        self.host_steps = [0] * len(self.params)
        self.common_step: int | None = 0

    def ensure_state(self, init: dict[str, float]) -> None:
        for key, value in init.items():
            if key not in self.flat_state:
                buf = flat_buffer(self.total, self.device, self.dtype, zero=value == 0)
                if value != 0:
                    real(buf).fill_(value)
                self.flat_state[key] = buf

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [flat[o:o + n].view(t.shape) for t, o, n in zip(self.locals, self.offsets, self.numels)]

    def local_state(self, key: str, i: int) -> torch.Tensor:
        o, n = self.offsets[i], self.numels[i]
        return self.flat_state[key][o:o + n]

    def as_dtensor(self, local: torch.Tensor, i: int) -> Any:
        """A local view as a DTensor laid out as parameter ``i``."""
        p = self.params[i]
        return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                  stride=p.stride())

    def refresh_common_step(self) -> None:
        steps = self.host_steps
        self.common_step = steps[0] if not steps or steps.count(steps[0]) == len(steps) else None

    def moved(self) -> bool:
        return [p.to_local().data_ptr() for p in self.params] != self.param_ptrs


def local_value(value: torch.Tensor, p: Any) -> torch.Tensor:
    """A loaded state tensor as parameter ``p``'s local shard: a DTensor is redistributed to ``p``'s
    placements first (a checkpoint from another sharding); a plain tensor must already be the local shard."""
    if is_dtensor(value):
        if value.device_mesh != p.device_mesh or tuple(value.placements) != tuple(p.placements):
            value = value.redistribute(p.device_mesh, p.placements)
        return value.to_local()
    local = p.to_local()
    if value.shape != local.shape:
        raise ValueError(f"a plain tensor of shape {tuple(value.shape)} cannot be the state of a DTensor "
                         f"parameter whose local shard has shape {tuple(local.shape)} (global "
                         f"{tuple(p.shape)}); load a sharded state dict (torch.distributed.checkpoint)")
    return value


def local_grads(bucket: ShardedBucket, owner: str) -> list[torch.Tensor | None]:
    """Each parameter's gradient as a flat local tensor (None where there is none)."""
    out = []
    for i, p in enumerate(bucket.params):
        g = p.grad
        if g is None:
            out.append(None)
            continue
        if not is_dtensor(g):
            raise RuntimeError(f"{owner}: parameter {bucket.positions[i]} of group {bucket.group_index} is a "
                               f"DTensor but its gradient is a plain {type(g).__name__}")
        out.append(g.to_local().reshape(-1))
    return out
