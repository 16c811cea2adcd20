"""The base class of every fused optimizer: torch.optim's bookkeeping, plus a step that runs a declared
update over flat buffers.

An optimizer declares, and the base class does the rest:

- ``_state_init(group)``: its state tensors under torch's names, in torch's order, with their initial
  values (``{"exp_avg": 0.0, "exp_avg_sq": 0.0}``); ``_step_in_state``: whether torch keeps
  ``state["step"]``; ``_state_at_construction``: whether torch creates the state in ``__init__`` (Adagrad)
  rather than at the first step;
- ``Scalars``: a ``NamedTuple`` of the update's scalars, and ``_scalars(group, step)`` that fills it;
- ``_flags(group)``: the update's boolean/int switches (each combination is compiled once);
- ``_eager_update(s, *flags, p, g, *state)``: the update op for op as torch's for-loop path (``s`` holds
  Python floats; complex tensors stay complex), and ``_fused_update(hp, *flags, p, g, *state)``: the same
  math as one elementwise pass, compiled (``hp``: the scalars as one tensor, ``Scalars(*hp.unbind())``
  names them; complex buffers come as real views).

A step is then one elementwise pass over each bucket (see ``_layout``): one compiled kernel call (or a
short eager sequence) whatever the number of tensors. Where only some parameters have gradients, or their
step counts differ (a parameter that joined training late), the bucket is cut into runs. Parameters are
checked each step: if ``p.data`` was replaced (``model.to(...)``, ``model.half()``, a user assignment) or
``param_groups`` was edited, the layout is rebuilt from the current values, and state is cast/moved to the
parameter as torch's ``load_state_dict`` would.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import torch
from torch.optim import Optimizer

from ..precision.q8math import CODE_DTYPES
from .compile import resolve_fused, run_fused
from .dtensor import ShardedBucket, check_params, is_dtensor
from .grads import adopt_grads
from .layout import DIRECT_GRAD_MIN_NUMEL, Bucket, real
from .state import (
    adopt_state,
    check_groups,
    import_float_state,
    order_new_state,
    validate_state_dict,
)
from .step import step_flat, step_sharded
from .validate import run_closure


def as_real(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Flat real views of flat buffers (a complex buffer becomes its interleaved real/imaginary parts)."""
    return tuple(map(real, tensors))


# pragma: no mutate start (compiled by torch.compile, which cannot trace mutmut's trampolines)
def fused_prologue(hp: torch.Tensor, p: torch.Tensor, g: torch.Tensor, maximize: bool):
    """The start every compiled update shares: param and gradient in the compute dtype (``hp``'s), the
    gradient negated for ``maximize``, and ``r``, which rounds to the storage dtype where torch's op-by-op
    path rounds (a no-op in float32/float64) so low-precision results track torch's."""
    cd, sd = hp.dtype, p.dtype

    def r(t: torch.Tensor) -> torch.Tensor:
        return t.to(sd).to(cd)

    gf = g.to(cd)
    return r, p.to(cd), (-gf if maximize else gf)
# pragma: no mutate end


class FusedOptimizer(Optimizer):
    """Base class: torch.optim bookkeeping plus the flat-buffer step. Subclasses declare the update (see the
    module docstring)."""

    Scalars: ClassVar[type[NamedTuple]]
    _eager_update: ClassVar[Callable[..., None]]
    _fused_update: ClassVar[Callable[..., None]]
    _step_in_state: ClassVar[bool] = True
    _state_at_construction: ClassVar[bool] = False
    #: per-parameter scalar state torch keeps as a 0-d float32 tensor beside ``step`` (NAdam's ``mu_product``),
    #: with its initial value: held in one host tensor per bucket, advanced by ``_advance_host_state`` before
    #: each run's scalars, which ``_scalars(group, step, values)`` then receives
    _host_state: ClassVar[dict[str, float]] = {}
    #: a checkpoint may lack ``step`` (its reference keeps none: lion-pytorch); it then loads as step 1
    _step_optional: ClassVar[bool] = False
    #: on the CPU, gradients of at least this many elements are read where they lie (see ``_layout``)
    direct_grad_min_numel: ClassVar[int] = DIRECT_GRAD_MIN_NUMEL
    #: on an accelerator, never: one multi-tensor copy brings every gradient into the buffer (~0.05 ms for
    #: ResNet-50's 25.6M on an H200), where a compiled call per large gradient cost 20-50 us of host time each
    #: (issue 11: Adam with the default zero_grad() was 4.01 ms there against 0.38 with gradients in place)
    direct_grad_min_numel_accelerator: ClassVar[int] = 1 << 62

    #: state keys that have an 8-bit form (codes of this dtype with per-block scales; see ``_q8math``)
    _code_dtypes: ClassVar[dict[str, torch.dtype]] = {}
    #: options a subclass adds to its base class's ``defaults`` (set before ``__init__`` runs)
    _more_defaults: dict[str, Any] = {}
    #: what torch's ``__setstate__`` gives a loaded group that lacks a key (a checkpoint from before torch had
    #: the option: it was off), rather than this optimizer's own constructor values; ``fused`` stays ours (None)
    _legacy_group_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, params: Any, defaults: dict[str, Any], fused: bool | None) -> None:
        defaults = {**defaults, **self._more_defaults}
        self._fused = resolve_fused(fused)
        self._fused_strict = fused is True
        self._buckets: list[Bucket] = []
        super().__init__(params, defaults)

    # ---- what a subclass declares --------------------------------------------------------------------------
    def _state_init(self, group: dict[str, Any]) -> dict[str, float]:
        raise NotImplementedError

    def _flags(self, group: dict[str, Any]) -> tuple:
        raise NotImplementedError

    def _scalars(self, group: dict[str, Any], step: int) -> NamedTuple:
        raise NotImplementedError

    def _advance_host_state(self, group: dict[str, Any], step: int, values: dict[str, torch.Tensor]) -> None:
        """Advance a run's ``_host_state`` (``values``: its parameters' elements) to ``step``, in place."""
        raise NotImplementedError

    # ---- what a subclass may refine (the 8-bit optimizers do) ----------------------------------------------
    def _bucket_kind(self, p: torch.Tensor, group: dict[str, Any], where: str) -> Any:
        """Parameters of a group are bucketed by device, dtype, DTensor-ness and this (None: nothing more).
        ``where`` names the parameter, for a refusal's message."""
        return None

    def _new_bucket(self, group_index: int, params: list[torch.Tensor], positions: list[int], device: torch.device,
                    kind: Any) -> Bucket:
        direct = self.direct_grad_min_numel if device.type == "cpu" else self.direct_grad_min_numel_accelerator
        return Bucket(group_index, params, positions, direct)

    def _bucket_init(self, bucket: Bucket, group: dict[str, Any]) -> dict[str, Any]:
        """The state a bucket keeps: ``_state_init``'s, unless a subclass stores some buckets differently."""
        return self._state_init(group)

    def _import_state(self, bucket: Bucket, i: int, old: dict[str, Any], init: dict[str, Any],
                      group: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Parameter ``i``'s loaded state, converted to what ``init`` stores."""
        return import_float_state(self, bucket, i, old, init, group)

    # ---- layout --------------------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        params = group["params"]
        if len({id(p) for p in params}) != len(params):
            del self.param_groups[-1]
            raise ValueError("some parameters appear more than once in the same parameter group; "
                             "optadvisor's optimizers lay parameters out in one buffer and need each once")
        for p in params:
            if p.is_sparse or p.layout != torch.strided:
                del self.param_groups[-1]
                raise ValueError(f"{type(self).__name__} supports only dense (strided) parameters, "
                                 f"got layout {p.layout}")
        known = len(self.state)
        try:
            buckets = self._make_buckets(len(self.param_groups) - 1)
        except Exception:
            del self.param_groups[-1]  # refused: the optimizer stays as it was
            raise
        self._buckets.extend(buckets)
        order_new_state(self, known)  # state made at construction (Adagrad's): in the parameters' order
        self._snapshot_groups()

    def _snapshot_groups(self) -> None:
        self._group_lists = [(g["params"], list(g["params"])) for g in self.param_groups]

    def _layout_changed(self) -> bool:
        """A parameter's memory moved (``p.data`` replaced, ``model.to(...)``), or ``param_groups`` was edited
        by hand: a group added or deleted, its ``params`` list replaced, appended to or changed in place."""
        groups = self.param_groups
        lists = self._group_lists
        if len(groups) != len(lists):
            return True
        for g, (lst, copy) in zip(groups, lists):
            now = g["params"]
            if now is not lst or len(now) != len(copy) or not all(map(operator.is_, now, copy)):
                return True
        return any(b.moved() for b in self._buckets)

    def _make_buckets(self, group_index: int) -> list[Bucket | ShardedBucket]:
        by_kind: dict[tuple, list[int]] = {}
        group = self.param_groups[group_index]
        params = group["params"]
        check_params(type(self).__name__, group_index, params)
        for i, p in enumerate(params):
            kind = self._bucket_kind(p, group, f"param_groups[{group_index}]['params'][{i}]")
            by_kind.setdefault((p.device, p.dtype, is_dtensor(p), kind), []).append(i)
        buckets = [ShardedBucket(group_index, params, positions, self.direct_grad_min_numel) if sharded else
                   self._new_bucket(group_index, params, positions, device, kind)
                   for (device, _, sharded, kind), positions in by_kind.items()]
        for bucket in buckets:
            adopt_state(self, bucket)
        return buckets

    def _rebuild(self) -> None:
        check_groups(self)
        known = len(self.state)
        self._buckets = []
        for gi in range(len(self.param_groups)):
            self._buckets.extend(self._make_buckets(gi))
        order_new_state(self, known)
        self._snapshot_groups()

    # ---- checkpoints -----------------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        validate_state_dict(self, state_dict)
        super().load_state_dict(state_dict)
        # torch casts every loaded state tensor but "step" to its parameter's dtype: 8-bit codes and their
        # float32 scales are put back as saved (import_float_state/_import_state convert them as needed)
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            saved = state_dict["state"].get(pid) or {}
            for key, value in saved.items():
                if isinstance(value, torch.Tensor) and (value.dtype in CODE_DTYPES or key.endswith("_absmax")):
                    self.state[p][key] = value.to(p.device)
        self._rebuild()

    def __getstate__(self) -> dict[str, Any]:
        # torch's keeps defaults, state and param_groups; ``fused`` (ours is not a group option) goes with them,
        # or a copy (``copy.deepcopy``, pickle) of a ``fused=False`` optimizer would run compiled
        return {**super().__getstate__(), "_fused": self._fused, "_fused_strict": self._fused_strict}

    def __setstate__(self, state: dict[str, Any]) -> None:
        own_defaults = set(state.get("defaults", self.__dict__.get("defaults", {})))
        super().__setstate__(state)
        if "differentiable" not in own_defaults:  # torch's __setstate__ adds it; an optimizer without the option
            self.defaults.pop("differentiable", None)  # (Lion) must not pass it to its groups on the next rebuild
        for group in self.param_groups:
            for key, value in self._legacy_group_defaults.items():
                group.setdefault(key, value)
        # a pickle from before ``fused`` was saved: the default, as a new optimizer gets it
        self.__dict__.setdefault("_fused", resolve_fused(None))
        self.__dict__.setdefault("_fused_strict", False)
        if "_buckets" not in self.__dict__:  # unpickling; load_state_dict (which calls us too) rebuilds itself
            self._rebuild()

    # ---- gradients -------------------------------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients, as :meth:`torch.optim.Optimizer.zero_grad`.

        ``set_to_none=True`` (the default) sets them to None, exactly as torch does. With
        ``set_to_none=False`` every gradient that exists becomes a view of this optimizer's flat gradient
        buffer (the tensor it replaces is zeroed too, for anyone still holding it), and each bucket's buffer
        is zeroed in one call; backward then accumulates into the buffer and ``step()`` copies nothing.
        Gradients that are None stay None, so those parameters are still skipped, as in torch.
        """
        if set_to_none:
            super().zero_grad(set_to_none=True)
            return
        # torch's __init__ and __setstate__ name the profiler record
        with torch.autograd.profiler.record_function(self._zero_grad_profile_name):
            if self._layout_changed():
                self._rebuild()
            for bucket in self._buckets:
                if isinstance(bucket, ShardedBucket):  # FSDP2 owns these gradients: zeroed where they are
                    for p in bucket.params:
                        if p.grad is not None:
                            p.grad.detach_()
                            p.grad.zero_()
                else:
                    adopt_grads(bucket)

    # ---- the step ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform a single optimization step. ``closure`` re-evaluates the model and returns the loss."""
        loss = run_closure(closure)
        if self._layout_changed():
            self._rebuild()
        known = len(self.state)
        for bucket in self._buckets:
            self._step_bucket(bucket)
        order_new_state(self, known)  # state made this step: in torch's order, not the buckets'
        return loss

    def _step_bucket(self, bucket: Bucket | ShardedBucket) -> None:
        (step_sharded if isinstance(bucket, ShardedBucket) else step_flat)(self, bucket)

    def _apply(self, s: NamedTuple, hp: torch.Tensor | None, flags: tuple, run: dict[str, torch.Tensor],
               bucket: Bucket) -> None:
        """One update over a run's slices (param, grad, then the state in ``_state_init`` order): compiled
        when enabled and possible (complex buffers as their real views), else eager."""
        if hp is not None and run_fused(type(self)._fused_update, flags, as_real(*run.values()), hp,
                                        strict=self._fused_strict)[0]:
            return
        type(self)._eager_update(s, *flags, *run.values())  # complex stays complex, as in torch's math
