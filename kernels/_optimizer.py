"""The shared machinery of every fused optimizer: flat buffers, gradient gathering, runs, state views.

Layout. Each param group's parameters are split by (device, dtype) into *buckets*. A bucket owns one flat,
contiguous buffer for the parameters, one for the gradients and one per state tensor (``exp_avg``, ...).
At construction each parameter is *re-homed*: ``p.data`` becomes an alias of its range of the bucket's
parameter buffer (the values are copied; the ``Parameter`` object is the same). On the CPU the alias has a
storage object of its own (``_memory.alias``), so saving a submodule writes only its parameters.
``optimizer.state[p]`` holds views into the state buffers, under torch's own keys, so ``state_dict()`` is
torch's format and torch.optim reads it.

A step is then one elementwise pass over each bucket: one compiled kernel call (or a short eager sequence)
whatever the number of tensors. Where only some parameters have gradients, or their step counts differ
(a parameter that joined training late), the bucket is cut into *runs* of neighbours that share a step
count and all have gradients; each run is one call on a slice of the buffers.

Gradients. Each step checks whether ``p.grad`` is the bucket's view for ``p``; a gradient that is not
(autograd's fresh tensors after ``zero_grad(set_to_none=True)``, torch's default, or one the user
assigned) is, if large and contiguous, read where it lies by a call of its own (large parameters sit at the
end of the buffers, so the small ones stay one run), and otherwise copied into the gradient buffer, all of
them in one ``_foreach_copy_``. ``p.grad`` itself is
left alone: pointing it at the buffer would free autograd's tensors at step time, and glibc then hands
that memory back to the OS and the next backward faults it in again (measured: +2 ms per iteration of a
40-layer MLP, a 15% slower loop). ``optimizer.zero_grad(set_to_none=False)`` is the opt-in: it points
every existing gradient at the buffer and zeroes the buffer in one call, so backward accumulates straight
into it and steps copy nothing. Parameters are checked
the same way: if ``p.data`` was replaced (``model.to(...)``, ``model.half()``, a user assignment) the
layout is rebuilt from the current values, and state is cast/moved to the parameter as torch's
``load_state_dict`` would.
"""

from __future__ import annotations

import ctypes
import operator
import threading
from collections.abc import Callable
from itertools import repeat
from typing import Any

import torch
from torch.optim import Optimizer

from ._compile import resolve_fused, run_fused
from ._memory import alias, flat_buffer


def _scalar_dtype() -> torch.dtype:
    # torch.optim keeps state["step"] in float32 unless the default dtype is float64
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype.is_complex:
        return torch.float64 if dtype == torch.complex128 else torch.float32
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_real(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Flat real views of flat buffers (a complex buffer becomes its interleaved real/imaginary parts)."""
    return tuple(_real(t) for t in tensors)


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


def _real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t).view(-1) if t.is_complex() else t


_hp_slots = threading.local()


def scalars_tensor(scalars: list[float], like: torch.Tensor) -> torch.Tensor:
    """The update's scalars as a 1-D tensor in ``like``'s compute dtype, on its device.

    On the CPU the values are written into a reused per-thread tensor through a ctypes view of its memory:
    ``torch.tensor(list)`` costs ~40 us per step once a step's streaming has evicted the caches, this a few.
    (A CPU kernel reads them before it returns, so one tensor per dtype and length serves every step.)"""
    dtype = _compute_dtype(like.dtype)
    if like.device.type != "cpu":
        return torch.tensor(scalars, dtype=dtype, device=like.device)
    slots = _hp_slots.__dict__
    key = (dtype, len(scalars))
    slot = slots.get(key)
    if slot is None:
        t = torch.empty(len(scalars), dtype=dtype)
        ctype = ctypes.c_double if dtype == torch.float64 else ctypes.c_float
        slot = slots[key] = (t, (ctype * len(scalars)).from_address(t.data_ptr()))
    slot[1][:] = scalars
    return slot[0]


_NOT_A_GRAD = object()
_data_ptr = torch.Tensor.data_ptr
_grad_of = operator.attrgetter("grad")


# A gradient of at least this many elements that is a tensor of its own (autograd's, after the default
# zero_grad(set_to_none=True)) is read where it lies, by a kernel call of its own, rather than copied into the
# gradient buffer: the copy moves 8 more bytes per element (SGD's step moves 20, Adam's 28), a call costs
# ~20-50 us, and 2^16 was best of 2^14..2^20 on ResNet-50 shapes and the 40-layer MLP loop (benchmarks,
# "separate grads"). Below it, one copy of many small gradients beats many calls.
DIRECT_GRAD_MIN_NUMEL = 1 << 16


class _Bucket:
    """Parameters of one group sharing a device and dtype, laid out in flat buffers.

    Parameters below :data:`DIRECT_GRAD_MIN_NUMEL` come first in the buffers, then the large ones, so that
    when large gradients are read in place the small ones still form one run."""

    def __init__(self, group_index: int, group_params: list[torch.Tensor], positions: list[int]):
        """``positions``: the indices in ``group_params`` of the parameters this bucket holds."""
        self.group_index = group_index
        small = [i for i in positions if group_params[i].numel() < DIRECT_GRAD_MIN_NUMEL]
        large = [i for i in positions if group_params[i].numel() >= DIRECT_GRAD_MIN_NUMEL]
        self.n_small = len(small)
        self.positions = small + large  # each parameter's index in its group's "params", for messages
        self.params = params = [group_params[i] for i in self.positions]
        self.numels = [p.numel() for p in params]
        self.offsets = []
        total = 0
        for n in self.numels:
            self.offsets.append(total)
            total += n
        self.total = total
        ref = params[0]
        self.device, self.dtype = ref.device, ref.dtype
        self.flat_param = flat_buffer(total, self.device, self.dtype, zero=False)
        for p, view in zip(params, self.views(self.flat_param)):
            view.copy_(p.detach())
        for p, o, n in zip(params, self.offsets, self.numels):
            p.data = alias(self.flat_param, o, n, p.shape)
        self.param_ptrs = [p.data_ptr() for p in params]
        base = self.flat_param.data_ptr()
        self.param_memory = (base, base + total * self.flat_param.element_size())
        self.flat_grad: torch.Tensor | None = None
        # a sentinel that no p.grad can be: until the buffer exists no gradient is "already in place"
        self.grad_views: list[Any] = [_NOT_A_GRAD] * len(params)
        self.flat_state: dict[str, torch.Tensor] = {}
        self.steps = torch.zeros(len(params), dtype=_scalar_dtype())
        self.host_steps = [0] * len(params)
        # the step every parameter shares (the usual case), or None once they differ; while it is set it is
        # authoritative and host_steps may lag (the usual step does not rewrite a list per step)
        self.common_step: int | None = 0
        self.run_cache: dict[tuple, dict[str, Any]] = {}

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [flat[o:o + n].view(p.shape) for p, o, n in zip(self.params, self.offsets, self.numels)]

    def ensure_grad_buffer(self) -> None:
        if self.flat_grad is None:
            self.flat_grad = flat_buffer(self.total, self.device, self.dtype, zero=True)
            self.grad_views = self.views(self.flat_grad)

    def ensure_state(self, keys: tuple[str, ...]) -> None:
        for key in keys:
            if key not in self.flat_state:
                self.flat_state[key] = flat_buffer(self.total, self.device, self.dtype, zero=True)

    def span(self, start: int, end: int) -> int:
        """How many elements parameters ``start:end`` hold."""
        return self.offsets[end - 1] + self.numels[end - 1] - self.offsets[start] if end > start else 0

    def slices(self, keys: tuple[str, ...], start: int, end: int,
               grad: bool = True) -> dict[str, torch.Tensor | None]:
        """The buffers' slices for parameters ``start:end`` (``grad``: with the gradient buffer's), in the
        order an update takes them: param, grad, then the state in ``keys`` order. Cached: every step asks
        for the same slices (the whole buffers, or the runs around large gradients read in place)."""
        key = (keys, start, end, grad)
        run = self.run_cache.get(key)
        if run is None:
            self.ensure_state(keys)
            lo = self.offsets[start]
            hi = lo + self.span(start, end)
            run = {"param": self.flat_param[lo:hi]}
            if grad:
                self.ensure_grad_buffer()
                run["grad"] = self.flat_grad[lo:hi]
            else:
                run["grad"] = None  # the caller's, in this position
            for k in keys:
                run[k] = self.flat_state[k][lo:hi]
            self.run_cache[key] = run
        return run

    def refresh_common_step(self) -> None:
        steps = self.host_steps
        self.common_step = steps[0] if not steps or steps.count(steps[0]) == len(steps) else None

    def moved(self) -> bool:
        # a new dtype or device means a new allocation, hence a new address
        # (map over the C methods: this runs every step, for every parameter)
        return list(map(_data_ptr, self.params)) != self.param_ptrs


class FusedOptimizer(Optimizer):
    """Base class: torch.optim bookkeeping plus the flat-buffer step. Subclasses give the math.

    Subclasses define ``_state_keys(group)`` (the per-parameter state tensors, torch's names),
    ``_step_in_state`` (whether torch keeps ``state["step"]``), and ``_update(group, run)`` which applies the
    update to one run (a dict of flat slices) through :meth:`_apply`.
    """

    _step_in_state = True

    def __init__(self, params: Any, defaults: dict[str, Any], fused: bool | None) -> None:
        self._fused = resolve_fused(fused)
        self._fused_strict = fused is True
        self._buckets: list[_Bucket] = []
        super().__init__(params, defaults)

    # ---- subclass interface -------------------------------------------------------------------------------
    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        raise NotImplementedError

    def _update(self, group: dict[str, Any], run: dict[str, torch.Tensor], step: int) -> None:
        raise NotImplementedError

    def _apply(self, eager: Callable[..., None], fused_fn: Callable[..., None], run: dict[str, torch.Tensor],
               scalars: list[float], flags: tuple, eager_kwargs: dict[str, Any]) -> None:
        """Run one update over a run's slices (``run``: param, grad, then the state buffers in
        ``_state_keys`` order): ``fused_fn(hp, *flags, *real_views)`` compiled when enabled and possible (complex buffers as
        their real views), else ``eager(*tensors, **eager_kwargs)``."""
        tensors = as_real(*run.values())
        if self._fused:
            hp = scalars_tensor(scalars, run["param"])
            if run_fused(fused_fn, flags, tensors, hp, strict=self._fused_strict)[0]:
                return
        eager(*run.values(), **eager_kwargs)  # complex stays complex: the eager math mirrors torch's handling

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
        self._buckets.extend(self._make_buckets(len(self.param_groups) - 1))
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

    def _make_buckets(self, group_index: int) -> list[_Bucket]:
        by_kind: dict[tuple, list[int]] = {}
        params = self.param_groups[group_index]["params"]
        for i, p in enumerate(params):
            by_kind.setdefault((p.device, p.dtype), []).append(i)
        buckets = [_Bucket(group_index, params, positions) for positions in by_kind.values()]
        for bucket in buckets:
            self._adopt_state(bucket)
        return buckets

    def _adopt_state(self, bucket: _Bucket) -> None:
        """Copy whatever ``self.state`` holds for the bucket's params into its flat buffers, then point
        ``self.state[p]`` at views of them."""
        group = self.param_groups[bucket.group_index]
        keys = self._state_keys(group)
        has_state = [bool(self.state.get(p)) for p in bucket.params]
        if not any(has_state):
            return
        bucket.ensure_state(keys)
        flat_views = {k: bucket.views(bucket.flat_state[k]) for k in keys}
        step_views = [bucket.steps[i] for i in range(len(bucket.params))]
        for i, p in enumerate(bucket.params):
            if not has_state[i]:
                continue
            old = self.state[p]
            new = dict(old)
            for k in keys:
                value = old.get(k)
                if value is None:
                    raise ValueError(f"state for parameter {bucket.positions[i]} of group "
                                     f"{bucket.group_index} lacks {k!r}, which {type(self).__name__} needs "
                                     "with these options")
                flat_views[k][i].copy_(value.detach().reshape(p.shape))
                new[k] = flat_views[k][i]
            if self._step_in_state:
                step = float(old["step"])
                step_views[i].fill_(step)
                new["step"] = step_views[i]
                bucket.host_steps[i] = int(step)
            else:
                bucket.host_steps[i] = 1
            self.state[p] = new
        bucket.refresh_common_step()

    def _rebuild(self) -> None:
        self._check_groups()
        self._buckets = []
        for gi in range(len(self.param_groups)):
            self._buckets.extend(self._make_buckets(gi))
        self._snapshot_groups()

    def _check_groups(self) -> None:
        """What ``add_param_group`` checks, for ``param_groups`` edited by hand since."""
        seen: dict[int, int] = {}
        for gi, g in enumerate(self.param_groups):
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
                    raise ValueError(f"{where}: {type(self).__name__} supports only dense (strided) parameters, "
                                     f"got layout {p.layout}")
                if id(p) in seen:
                    raise ValueError(f"{where}: this parameter is already in param group {seen[id(p)]}; "
                                     "each parameter may appear once across all groups")
                seen[id(p)] = gi
            for key, value in self.defaults.items():
                g.setdefault(key, value)

    # ---- checkpoints -----------------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._validate_state_dict(state_dict)
        super().load_state_dict(state_dict)
        self._rebuild()

    def _validate_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Everything torch would only find later (or never): checked before the optimizer changes."""
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("a state_dict needs the keys 'state' and 'param_groups' "
                             "(as returned by optimizer.state_dict())")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"loaded state dict has {len(saved_groups)} parameter groups, this optimizer "
                             f"has {len(self.param_groups)}")
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(f"loaded state dict's parameter group {gi} has {len(saved['params'])} "
                                 f"parameters, this optimizer's has {len(group['params'])}")
            options = {**group, **{k: v for k, v in saved.items() if k != "params"}}
            keys = self._state_keys(options)
            for pi, (p, pid) in enumerate(zip(group["params"], saved["params"])):
                st = state_dict["state"].get(pid)
                if not st:
                    continue
                where = f"state of parameter {pi} in group {gi}"
                for k in keys:
                    v = st.get(k)
                    if not isinstance(v, torch.Tensor):
                        raise ValueError(f"{where} lacks tensor {k!r} needed by {type(self).__name__} with "
                                         f"these options (got {type(v).__name__})")
                    if v.shape != p.shape:
                        raise ValueError(f"{where}: {k!r} has shape {tuple(v.shape)}, the parameter has "
                                         f"{tuple(p.shape)}")
                if self._step_in_state:
                    s = st.get("step")
                    if s is None or (isinstance(s, torch.Tensor) and s.numel() != 1):
                        raise ValueError(f"{where} lacks a scalar 'step'")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_fused", resolve_fused(None))
        self.__dict__.setdefault("_fused_strict", False)
        if "_buckets" not in self.__dict__:  # unpickling; load_state_dict (which calls us too) rebuilds itself
            self._rebuild()
        elif "_group_lists" not in self.__dict__:
            self._snapshot_groups()

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
        if not hasattr(self, "_zero_grad_profile_name"):
            self._patch_step_function()
        with torch.autograd.profiler.record_function(self._zero_grad_profile_name):
            if self._layout_changed():
                self._rebuild()
            for bucket in self._buckets:
                grads = list(map(_grad_of, bucket.params))
                if not all(map(operator.is_, grads, bucket.grad_views)):
                    self._adopt_grads(bucket, grads)
                if bucket.flat_grad is not None:
                    bucket.flat_grad.zero_()

    def _adopt_grads(self, bucket: _Bucket, grads: list[torch.Tensor | None]) -> None:
        bucket.ensure_grad_buffer()
        replaced = []
        for p, g, view in zip(bucket.params, grads, bucket.grad_views):
            if g is None or g is view:
                continue
            if g.grad_fn is not None:
                g.detach_()
            else:
                g.requires_grad_(False)
            if g.is_sparse or g.layout != torch.strided:
                g.zero_()  # a sparse gradient stays (zeroed, as torch would): step() refuses it
                continue
            replaced.append(g)
            p.grad = view
        if replaced:
            torch._foreach_zero_(replaced)

    # ---- the step ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform a single optimization step. ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._layout_changed():
            self._rebuild()
        for bucket in self._buckets:
            self._step_bucket(bucket)
        return loss

    def _gather_grads(self, bucket: _Bucket) -> tuple[list[bool] | None, dict[int, torch.Tensor] | None]:
        """Bring the gradients where the step reads them. Returns ``(present, direct)``: ``present`` is None
        when every parameter has a gradient, else a per-parameter mask of who has one; ``direct`` maps the
        index of each large parameter whose gradient is read where it lies (see
        :data:`DIRECT_GRAD_MIN_NUMEL`) to that gradient, flat. Every other gradient is in the buffer."""
        grads = list(map(_grad_of, bucket.params))
        if all(map(operator.is_, grads, bucket.grad_views)):
            return None, None
        direct = None
        views = bucket.grad_views
        for i in range(bucket.n_small, len(grads)):
            g = grads[i]
            if (g is not None and g is not views[i] and g.layout is torch.strided and g.is_contiguous()
                    and not bucket.param_memory[0] <= g.data_ptr() < bucket.param_memory[1]):
                if direct is None:
                    direct = {}
                direct[i] = g.view(-1)
        copied = [i for i, (g, view) in enumerate(zip(grads, views))
                  if g is not None and g is not view and (direct is None or i not in direct)]
        if copied:
            bucket.ensure_grad_buffer()
            views = bucket.grad_views
            dsts, srcs = [views[i] for i in copied], [grads[i] for i in copied]
            try:
                torch._foreach_copy_(dsts, srcs)  # one call; layouts are checked only if it fails
            except RuntimeError:
                self._refuse_unsupported_grads(bucket, grads)
                raise
        if any(map(operator.is_, grads, repeat(None))):
            return [g is not None for g in grads], direct
        return None, direct

    def _refuse_unsupported_grads(self, bucket: _Bucket, grads: list[torch.Tensor | None]) -> None:
        for i, g in enumerate(grads):
            if g is not None and (g.is_sparse or g.layout != torch.strided):
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients (parameter "
                                   f"{bucket.positions[i]} of group {bucket.group_index} has a {g.layout} "
                                   "gradient); use torch.optim.SparseAdam or dense gradients")

    def _step_bucket(self, bucket: _Bucket) -> None:
        present, direct = self._gather_grads(bucket)
        if present is not None and not any(present):
            return
        group = self.param_groups[bucket.group_index]
        keys = self._state_keys(group)
        common = bucket.common_step
        if present is None and common is not None:
            # the usual step: every parameter has a gradient and they share a step count
            self._update_run(bucket, group, keys, 0, len(bucket.params), direct, common + 1)
            if not keys and not self._step_in_state:
                return  # stateless (SGD without momentum): torch keeps no state, nor do we
            if self._step_in_state:
                bucket.steps.add_(1)
            if common == 0:
                self._expose_state(bucket, 0, len(bucket.params), keys)
            bucket.common_step = common + 1
            return
        bucket.ensure_state(keys)
        if common is not None:
            bucket.host_steps = [common] * len(bucket.params)
        steps = bucket.host_steps
        for start, end in self._runs(present, steps):
            new_step = steps[start] + 1
            self._update_run(bucket, group, keys, start, end, direct, new_step)
            if self._step_in_state:
                bucket.steps[start:end].add_(1)
            if not keys and not self._step_in_state:
                continue  # stateless (SGD without momentum): torch keeps no state, nor do we
            if steps[start] == 0:
                self._expose_state(bucket, start, end, keys)
            steps[start:end] = [new_step] * (end - start)
        bucket.refresh_common_step()

    def _update_run(self, bucket: _Bucket, group: dict[str, Any], keys: tuple[str, ...], start: int, end: int,
                    direct: dict[int, torch.Tensor] | None, step: int) -> None:
        """Update parameters ``start:end`` of the bucket (all with gradients, all at the same step): one call
        on the buffers' slices, except that each parameter in ``direct`` gets a call of its own that reads
        its gradient where it lies."""
        s = start
        for i in (direct or ()):  # ascending: _gather_grads fills it in index order
            if i < start or i >= end:
                continue
            if bucket.span(s, i):
                self._update(group, bucket.slices(keys, s, i), step)
            self._update(group, {**bucket.slices(keys, i, i + 1, grad=False), "grad": direct[i]}, step)
            s = i + 1
        if bucket.span(s, end):
            self._update(group, bucket.slices(keys, s, end), step)

    @staticmethod
    def _runs(present: list[bool] | None, steps: list[int]) -> list[tuple[int, int]]:
        n = len(steps)
        if present is None and steps[0] == steps[-1] and steps.count(steps[0]) == n:
            return [(0, n)]
        runs, start = [], None
        for i in range(n):
            if present is not None and not present[i]:
                if start is not None:
                    runs.append((start, i))
                start = None
            elif start is None:
                start = i
            elif steps[i] != steps[start]:
                runs.append((start, i))
                start = i
        if start is not None:
            runs.append((start, n))
        return runs

    def _expose_state(self, bucket: _Bucket, start: int, end: int, keys: tuple[str, ...]) -> None:
        bucket.ensure_state(keys)  # a bucket of empty tensors has run no update that would have made them
        for i in range(start, end):
            p, o, n = bucket.params[i], bucket.offsets[i], bucket.numels[i]
            entry = {}
            if self._step_in_state:
                entry["step"] = bucket.steps[i]
            for k in keys:
                entry[k] = bucket.flat_state[k][o:o + n].view(p.shape)
            self.state[p] = entry
