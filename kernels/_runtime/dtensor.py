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

import sys
from typing import Any

import torch

from .layout import StateBuffers, scalar_dtype
from .memory import flat_buffer

_DTENSOR_MODULE = "torch.distributed.tensor"


def _dtensor_module() -> Any:
    """``torch.distributed.tensor`` if something has imported it, else None: no DTensor can exist before it
    is imported, and importing it here would cost every user 0.6 s and ~10^5 objects that each full garbage
    collection then walks (a 0.2 s pause inside a small training loop was measured)."""
    return sys.modules.get(_DTENSOR_MODULE)


def is_dtensor(t: Any) -> bool:
    module = _dtensor_module()
    return module is not None and isinstance(t, module.DTensor)


def check_params(owner: str, group_index: int, params: list[torch.Tensor]) -> None:
    """Refuse what a shard-local elementwise update cannot serve, naming the parameter."""
    meshes = {}
    for i, p in enumerate(params):
        if not is_dtensor(p):
            continue
        where = f"param_groups[{group_index}]['params'][{i}]"
        for placement in p.placements:
            if isinstance(placement, _dtensor_module().Partial):
                raise ValueError(f"{owner}: {where} is a DTensor with placement {placement!r} (a pending "
                                 "reduction): its local values are not the parameter's, so an elementwise "
                                 "update of them would be wrong; redistribute it to Shard or Replicate first")
        meshes.setdefault(p.device_mesh, where)
    if len(meshes) > 1:
        first, *others = meshes.values()
        raise ValueError(f"{owner}: parameter group {group_index} mixes DTensors on different device meshes "
                         f"({first} and {others[0]}); put each mesh's parameters in a group of its own")


class ShardedBucket(StateBuffers):
    """DTensor parameters of one group sharing a device and dtype. Same interface as ``_layout.Bucket`` for
    state and step counts. Shards of at least ``direct_min`` elements are updated where they lie, one call
    each; the smaller ones (biases, norms) first, packed: copied into a flat buffer with their gradients by
    two multi-tensor copies, updated by one call and copied back, so they do not cost a call apiece."""

    sharded = True

    def __init__(self, group_index: int, group_params: list[torch.Tensor], positions: list[int],
                 direct_min: int):
        self.group_index = group_index
        sizes = {i: group_params[i].to_local().numel() for i in positions}
        small = [i for i in positions if sizes[i] < direct_min]
        self.n_small = len(small)
        self.positions = small + [i for i in positions if sizes[i] >= direct_min]
        self.params = [group_params[i] for i in self.positions]
        # detached: ``to_local()`` is an autograd Function, and torch.compile refuses in-place updates of a
        # view made by one ("a view created inside a custom Function"); the detached tensor is the same
        # memory without that history
        self.locals = [p.to_local().detach() for p in self.params]
        for p, t, pos in zip(self.params, self.locals, self.positions):
            if not t.is_contiguous():
                raise ValueError(f"param_groups[{group_index}]['params'][{pos}]: its local shard is not "
                                 "contiguous, so it cannot be updated in place by the fused pass")
        self.local_flat = [t.view(-1) for t in self.locals]
        self.numels = [t.numel() for t in self.locals]
        self.offsets, total = [], 0
        for n in self.numels:
            self.offsets.append(total)
            total += n
        self.total = total
        self.device, self.dtype = self.locals[0].device, self.locals[0].dtype
        self.param_ptrs = [t.data_ptr() for t in self.locals]
        self.flat_state: dict[str, torch.Tensor] = {}
        self.small_total = sum(self.numels[:self.n_small])
        self.packed: tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]] | None = None
        self.steps = torch.zeros(len(self.params), dtype=scalar_dtype())
        self.host_steps = [0] * len(self.params)
        self.common_step: int | None = 0

    def packed_buffers(self) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """(param buffer, gradient buffer, their per-parameter views) for the small shards, made once."""
        if self.packed is None:
            p = flat_buffer(self.small_total, self.device, self.dtype, zero=False)
            g = flat_buffer(self.small_total, self.device, self.dtype, zero=False)
            views = [(p[o:o + n], g[o:o + n]) for o, n in zip(self.offsets, self.numels[:self.n_small])]
            self.packed = (p, g, [v for v, _ in views], [w for _, w in views])
        return self.packed

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [flat[o:o + n].view(t.shape) for t, o, n in zip(self.locals, self.offsets, self.numels)]

    def local_state(self, key: str, i: int) -> torch.Tensor:
        o, n = self.offsets[i], self.numels[i]
        return self.flat_state[key][o:o + n]

    def as_dtensor(self, local: torch.Tensor, i: int) -> Any:
        """A local view as a DTensor laid out as parameter ``i``."""
        p = self.params[i]
        if local.storage_offset():
            # a DTensor over a view at an offset into the flat buffer cannot be copied or saved: torch takes
            # its wrapper's nonzero data pointer for real storage ("invalid python storage" from copy.deepcopy
            # and torch.save). The same memory as a tensor of its own (DLPack: public, any device; it keeps
            # the flat buffer alive) has offset 0.
            local = torch.from_dlpack(local)
        return _dtensor_module().DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                  stride=p.stride())

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
