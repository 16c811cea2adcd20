"""State import, export and validation: ``optimizer.state`` as views of a bucket's flat buffers, under
torch's own keys (so ``state_dict()`` is torch's format and torch.optim reads it), and every check a loaded
state dict or a hand-edited ``param_groups`` must pass before the optimizer changes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..precision.q8math import CODE_DTYPES, check_codes, dequantize
from .dtensor import local_value
from .layout import Bucket

if TYPE_CHECKING:
    from .optimizer import FusedOptimizer


def adopt_state(opt: FusedOptimizer, bucket: Bucket) -> None:
    """Copy whatever ``opt.state`` holds for the bucket's params into its flat buffers, then point
    ``opt.state[p]`` at views of them. An optimizer whose state exists from construction (Adagrad) gets
    its initial state for every parameter that has none."""
    group = opt.param_groups[bucket.group_index]
    init = opt._bucket_init(bucket, group)
    sharded = getattr(bucket, "sharded", False)
    has_state = [bool(opt.state.get(p)) for p in bucket.params]
    if any(has_state):
        bucket.ensure_state(init)
        if opt._host_state:  # loaded scalar state is in the parameters' dtype, as torch's load_state_dict casts it
            bucket.host_values(opt._host_state)
            bucket.cast_host_state(bucket.dtype if bucket.dtype.is_floating_point else None)
        flat_views = {k: bucket.views(bucket.flat_state[k]) for k in init} if sharded else {}
        for i, p in enumerate(bucket.params):
            if not has_state[i]:
                continue
            old = opt.state[p]
            new = {k: v for k, v in old.items() if not k.endswith("_absmax")}
            values = opt._import_state(bucket, i, old, init, group)
            for k in init:
                value = values[k]
                if sharded:
                    flat_views[k][i].copy_(local_value(value.detach(), p))
                    new[k] = bucket.as_dtensor(flat_views[k][i], i)
                else:
                    view = bucket.state_view(k, init[k], i)
                    view.copy_(value.detach().reshape(view.shape))
                    new[k] = view
            if opt._step_in_state:
                step = float(old["step"] if "step" in old or not opt._step_optional else 1)
                bucket.steps[i].fill_(step)
                new["step"] = bucket.steps[i]
                bucket.host_steps[i] = int(step)
            else:
                bucket.host_steps[i] = 1
            for k, t in bucket.host_values(opt._host_state).items():  # (a loaded one was validated)
                if k not in old:  # opt.state edited by hand
                    raise ValueError(f"state for parameter {bucket.positions[i]} of group {bucket.group_index} "
                                     f"lacks {k!r}, which {type(opt).__name__} needs with these options")
                t[i] = float(old[k])
                new[k] = t[i]
            opt.state[p] = new
        bucket.refresh_common_step()
    if opt._state_at_construction and not all(has_state):
        bucket.ensure_state(init)
        for i in range(len(bucket.params)):
            if not has_state[i]:
                expose_state(opt, bucket, i, i + 1, init)


def expose_state(opt: FusedOptimizer, bucket: Bucket, start: int, end: int, init: dict[str, float]) -> None:
    """``opt.state[p]`` for parameters ``start:end``: views of the flat buffers, in torch's key order."""
    bucket.ensure_state(init)  # a bucket of empty tensors has run no update that would have made them
    sharded = getattr(bucket, "sharded", False)
    for i in range(start, end):
        p, o, n = bucket.params[i], bucket.offsets[i], bucket.numels[i]
        entry = {}
        if opt._step_in_state:
            entry["step"] = bucket.steps[i]
        for k, t in bucket.host_values(opt._host_state).items():
            entry[k] = t[i]
        for k in init:
            if sharded:  # a DTensor laid out as the parameter: torch's format for sharded optimizers
                entry[k] = bucket.as_dtensor(bucket.flat_state[k][o:o + n].view(bucket.locals[i].shape), i)
            else:
                entry[k] = bucket.state_view(k, init[k], i)
        opt.state[p] = entry


def order_new_state(opt: FusedOptimizer, known: int) -> None:
    """Put the entries added to ``opt.state`` after its first ``known`` ones in torch's order.

    torch.optim makes a parameter's state when it first steps, walking the groups and their parameters in
    order, and ``state_dict()`` lists the state in that insertion order. Buckets expose state in their own
    order (small parameters first, one bucket per device, dtype and kind), so the new entries are put back in
    the parameters' order: the checkpoints' order is torch's (tools diff them, and read them in order)."""
    if len(opt.state) - known < 2:  # nothing, or one entry, added: nothing to reorder (the usual step)
        return
    new = list(opt.state)[known:]
    rank = {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    ordered = sorted(new, key=lambda p: rank.get(id(p), len(rank)))
    if all(a is b for a, b in zip(ordered, new)):
        return
    entries = {id(p): opt.state.pop(p) for p in new}
    for p in ordered:
        opt.state[p] = entries[id(p)]


def import_float_state(opt: FusedOptimizer, bucket: Bucket, i: int, old: dict[str, Any],
                       init: dict[str, Any], group: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Parameter ``i``'s loaded state as the float tensors ``init`` names; 8-bit state (codes with per-block
    scales, as the 8-bit optimizers save it) is dequantized."""
    out = {}
    for k in init:
        value = old.get(k)
        if value is None:
            raise ValueError(f"state for parameter {bucket.positions[i]} of group {bucket.group_index} "
                             f"lacks {k!r}, which {type(opt).__name__} needs with these options")
        if isinstance(value, torch.Tensor) and value.dtype in CODE_DTYPES:
            value = dequantize(value, old[k + "_absmax"], group["block_size"])
        out[k] = value
    return out


def check_state_dict_keys(state_dict: Any) -> None:
    """An optimizer state dict at all: a dict with 'state' and 'param_groups'."""
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError("a state_dict needs the keys 'state' and 'param_groups' "
                         "(as returned by optimizer.state_dict())")


def validate_state_dict(opt: FusedOptimizer, state_dict: dict[str, Any]) -> None:
    """Everything torch would only find later (or never): checked before the optimizer changes."""
    check_state_dict_keys(state_dict)
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError(f"loaded state dict has {len(saved_groups)} parameter groups, this optimizer "
                         f"has {len(opt.param_groups)}")
    for gi, (group, saved) in enumerate(zip(opt.param_groups, saved_groups)):
        if len(group["params"]) != len(saved["params"]):
            raise ValueError(f"loaded state dict's parameter group {gi} has {len(saved['params'])} "
                             f"parameters, this optimizer's has {len(group['params'])}")
        # the options the loaded group will have: the saved ones, those it lacks as torch's __setstate__ fills
        # them (see FusedOptimizer._legacy_group_defaults), then ours
        options = {**group, **opt._legacy_group_defaults, **{k: v for k, v in saved.items() if k != "params"}}
        keys = tuple(opt._state_init(options))
        for pi, (p, pid) in enumerate(zip(group["params"], saved["params"])):
            st = state_dict["state"].get(pid)
            if not st:
                continue
            where = f"state of parameter {pi} in group {gi}"
            for k in keys:
                v = st.get(k)
                if not isinstance(v, torch.Tensor):
                    raise ValueError(f"{where} lacks tensor {k!r} needed by {type(opt).__name__} with "
                                     f"these options (got {type(v).__name__})")
                if v.shape != p.shape:
                    raise ValueError(f"{where}: {k!r} has shape {tuple(v.shape)}, the parameter has "
                                     f"{tuple(p.shape)}")
                if not (v.is_floating_point() or v.is_complex()):
                    # the block size the codes were made with: the saved group's own, never assumed
                    check_codes(where, k, v, st.get(k + "_absmax"), saved.get("block_size"), p.numel(),
                                opt._code_dtypes.get(k))
            comp = st.get("kahan_comp")
            if comp is not None and (not isinstance(comp, torch.Tensor) or comp.shape != p.shape
                                     or not comp.is_floating_point()):
                raise ValueError(f"{where}: 'kahan_comp' must be a floating-point tensor of the parameter's "
                                 f"shape {tuple(p.shape)} (got {getattr(comp, 'shape', type(comp).__name__)})")
            for k in opt._host_state:
                v = st.get(k)
                if not isinstance(v, (torch.Tensor, float, int)) or isinstance(v, bool):
                    raise ValueError(f"{where} lacks the scalar {k!r} needed by {type(opt).__name__} "
                                     f"(got {type(v).__name__})")
                if isinstance(v, torch.Tensor) and v.numel() != 1:
                    raise ValueError(f"{where}: {k!r} has shape {tuple(v.shape)}; it is a scalar")
                if isinstance(v, torch.Tensor) and not v.is_floating_point():
                    raise ValueError(f"{where}: {k!r} must be floating-point (got {v.dtype})")
            if opt._step_in_state:
                s = st.get("step")
                if (s is None and not opt._step_optional) or (isinstance(s, torch.Tensor) and s.numel() != 1):
                    raise ValueError(f"{where} lacks a scalar 'step'")


def check_groups(opt: FusedOptimizer) -> None:
    """What ``add_param_group`` checks, for ``param_groups`` edited by hand since."""
    seen: dict[int, int] = {}
    for gi, g in enumerate(opt.param_groups):
        params = g.get("params")
        if not isinstance(params, list):
            raise TypeError(f"param_groups[{gi}]['params'] must be a list of tensors (got "
                            f"{type(params).__name__})")
        for pi, p in enumerate(params):
            where = f"param_groups[{gi}]['params'][{pi}]"
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"{where}: optimizer can only optimize Tensors, but one of the params is "
                                f"{torch.typename(p)}")
            if not p.is_leaf:
                raise ValueError(f"{where}: can't optimize a non-leaf Tensor")
            if p.is_sparse or p.layout != torch.strided:
                raise ValueError(f"{where}: {type(opt).__name__} supports only dense (strided) parameters, "
                                 f"got layout {p.layout}")
            if id(p) in seen:
                raise ValueError(f"{where}: this parameter is already in param group {seen[id(p)]}; "
                                 "each parameter may appear once across all groups")
            seen[id(p)] = gi
        for key, value in opt.defaults.items():
            g.setdefault(key, value)
