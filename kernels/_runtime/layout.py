"""Buffer layout: a bucket's flat, contiguous buffers for parameters, gradients and state, and its runs.

Each param group's parameters are split by (device, dtype) into *buckets*. A bucket owns one flat buffer
for the parameters, one for the gradients and one per state tensor (``exp_avg``, ...). At construction each
parameter is *re-homed*: ``p.data`` becomes an alias of its range of the parameter buffer (the values are
copied; the ``Parameter`` object is the same). On the CPU the alias has a storage object of its own
(``_memory.alias``), so saving a submodule writes only its parameters.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any, NamedTuple

import torch

from .memory import alias, flat_buffer

# A gradient of at least this many elements that is a tensor of its own (autograd's, after the default
# zero_grad(set_to_none=True)) is read where it lies, by a kernel call of its own, rather than copied into the
# gradient buffer: the copy moves 8 more bytes per element (SGD's step moves 20, Adam's 28), a call costs
# ~20-50 us, and 2^16 was best of 2^14..2^20 on ResNet-50 shapes and the 40-layer MLP loop (benchmarks,
# "separate grads"). Below it, one copy of many small gradients beats many calls. An optimizer class may
# set its own (``FusedOptimizer.direct_grad_min_numel``); the tests do, to reach this path with small shapes.
DIRECT_GRAD_MIN_NUMEL = 1 << 16

# a sentinel that no p.grad can be: until the buffer exists no gradient is "already in place"
NOT_A_GRAD = object()
NOT_PLANNED = object()  # a bucket's gradient-copy plan before the first copy
_data_ptr = torch.Tensor.data_ptr


def scalar_dtype() -> torch.dtype:
    """torch.optim keeps state["step"] in float32 unless the default dtype is float64."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype.is_complex:
        return torch.float64 if dtype == torch.complex128 else torch.float32
    return torch.float64 if dtype == torch.float64 else torch.float32


def real(t: torch.Tensor) -> torch.Tensor:
    """A flat buffer's real view (a complex buffer becomes its interleaved real/imaginary parts)."""
    return torch.view_as_real(t).view(-1) if t.is_complex() else t


_hp_slots = threading.local()
_RING = 8  # pinned host buffers per (device, dtype, length): a step waits only if the device is 8 steps behind


class _PinnedRing:
    """Scalars for an accelerator without a synchronizing copy: ``torch.tensor(list, device="cuda")`` copies
    from pageable memory and waits for the whole stream (host and device then never overlap). Each call
    writes the next pinned host buffer (through a ctypes view), copies it asynchronously into a fresh device
    tensor (the caching allocator makes that cheap and stream-safe) and records an event; a buffer is
    reused only once its event shows its copy has finished."""

    def __init__(self, device: torch.device, dtype: torch.dtype, n: int) -> None:
        ctype = ctypes.c_double if dtype == torch.float64 else ctypes.c_float
        self.device, self.dtype, self.n = device, dtype, n
        self.host = [torch.empty(n, dtype=dtype, pin_memory=True) for _ in range(_RING)]
        self.views = [(ctype * n).from_address(t.data_ptr()) for t in self.host]
        self.events: list[Any] = [None] * _RING
        self.next = 0

    def __call__(self, scalars: tuple[float, ...]) -> torch.Tensor:
        i = self.next
        self.next = (i + 1) % _RING
        if self.events[i] is not None:
            self.events[i].synchronize()  # returns at once unless the device is _RING copies behind
        self.views[i][:] = scalars
        out = torch.empty(self.n, dtype=self.dtype, device=self.device)
        out.copy_(self.host[i], non_blocking=True)
        event = self.events[i] = torch.Event(device=self.device)
        event.record()
        return out


def device_scalars(scalars: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``torch.tensor(scalars, dtype=dtype, device=device)`` for an accelerator, without synchronizing."""
    slots = _hp_slots.__dict__
    key = (device, dtype, len(scalars))
    ring = slots.get(key)
    if ring is None:
        try:
            ring = slots[key] = _PinnedRing(device, dtype, len(scalars))
        except RuntimeError:  # no pinned memory for this device: the plain, blocking copy
            ring = slots[key] = lambda values: torch.tensor(values, dtype=dtype, device=device)
    return ring(tuple(scalars))


def scalars_tensor(scalars: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
    """The update's scalars as a 1-D tensor in ``like``'s compute dtype, on its device.

    On the CPU the values are written into a reused per-thread tensor through a ctypes view of its memory:
    ``torch.tensor(list)`` costs ~40 us per step once a step's streaming has evicted the caches, this a few.
    (A CPU kernel reads them before it returns, so one tensor per dtype and length serves every step.)
    On an accelerator they go through a ring of pinned buffers, asynchronously (:class:`_PinnedRing`)."""
    dtype = compute_dtype(like.dtype)
    slots = _hp_slots.__dict__
    if like.device.type != "cpu":
        return device_scalars(scalars, like.device, dtype)
    key = (dtype, len(scalars))
    slot = slots.get(key)
    if slot is None:
        t = torch.empty(len(scalars), dtype=dtype)
        ctype = ctypes.c_double if dtype == torch.float64 else ctypes.c_float
        slot = slots[key] = (t, (ctype * len(scalars)).from_address(t.data_ptr()))
    slot[1][:] = scalars
    return slot[0]


class Blockwise(NamedTuple):
    """A state buffer that is not one element of the parameters' dtype per parameter element: ``dtype`` (an
    8-bit code, a float32 scale), one element per parameter element (``block`` None: codes, shaped as the
    parameter) or one per block of ``block`` elements (scales, 1-D), filled with ``fill``. ``_state_init``
    values are floats (the parameter's dtype, one per element) or this."""

    fill: float
    dtype: torch.dtype
    block: int | None = None

    @property
    def per(self) -> int:
        return self.block or 1


def spec(value: float | Blockwise, dtype: torch.dtype) -> Blockwise:
    return value if isinstance(value, Blockwise) else Blockwise(value, dtype)


class StateBuffers:
    """What every bucket shares (this one and ``_dtensor.ShardedBucket``): flat state buffers of ``total``
    elements with their initial values, and per-parameter step counts."""

    total: int
    device: torch.device
    dtype: torch.dtype
    flat_state: dict[str, torch.Tensor]
    host_steps: list[int]
    common_step: int | None

    def ensure_state(self, init: dict[str, float]) -> None:
        """A flat buffer per state key, filled with its initial value (the real and imaginary parts of a
        complex one both, as torch fills ``complex(v, v)``)."""
        for key, value in init.items():
            if key not in self.flat_state:
                fill, dtype, _ = sp = spec(value, self.dtype)
                buf = flat_buffer(self.total // sp.per, self.device, dtype, zero=fill == 0)
                if fill != 0:
                    real(buf).fill_(fill)
                self.flat_state[key] = buf

    def refresh_common_step(self) -> None:
        steps = self.host_steps
        self.common_step = steps[0] if not steps or steps.count(steps[0]) == len(steps) else None
        if any(bool((t != t[0]).any()) for t in self.__dict__.get("host_state", {}).values() if len(t)):
            self.common_step = None  # a scalar state that differs between parameters: the per-run path

    def host_values(self, declared: dict[str, float]) -> dict[str, torch.Tensor]:
        """Per-parameter scalar state (``FusedOptimizer._host_state``): a float32 host tensor per key."""
        host = self.__dict__.setdefault("host_state", {})
        for key, value in declared.items():
            if key not in host:
                host[key] = torch.full((len(self.host_steps),), float(value), dtype=scalar_dtype())
        return host

    def cast_host_state(self, dtype: torch.dtype | None) -> None:  # None: float32 (torch's fresh state's)
        host = self.__dict__.get("host_state", {})
        host.update({key: t.to(dtype or scalar_dtype()) for key, t in host.items()})

    def run_keys(self, declared: dict[str, float]) -> list[Any]:
        """What a run's parameters share (``runs``): their step count, and their scalar state's values."""
        return list(zip(self.host_steps, *[t.tolist() for t in self.host_values(declared).values()])) \
            if declared else self.host_steps


class Bucket(StateBuffers):
    """Parameters of one group sharing a device and dtype, laid out in flat buffers.

    Parameters below ``direct_min`` elements come first in the buffers, then the large ones, so that when
    large gradients are read in place (see :data:`DIRECT_GRAD_MIN_NUMEL`) the small ones still form one run.
    With ``align`` > 1 (block-wise quantized state) each parameter starts at a multiple of ``align`` and the
    gap after it is zero in every buffer, so a block never holds two parameters.
    """

    def __init__(self, group_index: int, group_params: list[torch.Tensor], positions: list[int],
                 direct_min: int = DIRECT_GRAD_MIN_NUMEL, align: int = 1):
        """``positions``: the indices in ``group_params`` of the parameters this bucket holds."""
        self.group_index = group_index
        self.align = align
        small = [i for i in positions if group_params[i].numel() < direct_min]
        large = [i for i in positions if group_params[i].numel() >= direct_min]
        self.n_small = len(small)
        self.positions = small + large  # each parameter's index in its group's "params", for messages
        self.params = params = [group_params[i] for i in self.positions]
        self.numels = [p.numel() for p in params]
        self.padded = [-(-n // align) * align for n in self.numels]
        self.offsets = []
        total = 0
        for n in self.padded:
            self.offsets.append(total)
            total += n
        self.total = total
        ref = params[0]
        self.device, self.dtype = ref.device, ref.dtype
        self.flat_param = flat_buffer(total, self.device, self.dtype, zero=align > 1)
        for p, view in zip(params, self.views(self.flat_param)):
            view.copy_(p.detach())
        for p, o, n in zip(params, self.offsets, self.numels):
            p.data = alias(self.flat_param, o, n, p.shape)
        self.param_ptrs = [p.data_ptr() for p in params]
        base = self.flat_param.data_ptr()
        self.param_memory = (base, base + total * self.flat_param.element_size())
        self.flat_grad: torch.Tensor | None = None
        self.grad_views: list[Any] = [NOT_A_GRAD] * len(params)
        self.flat_state: dict[str, torch.Tensor] = {}
        self.steps = torch.zeros(len(params), dtype=scalar_dtype())
        self.host_steps = [0] * len(params)
        # the step every parameter shares (the usual case), or None once they differ; while it is set it is
        # authoritative and host_steps may lag (the usual step does not rewrite a list per step)
        self.common_step: int | None = 0
        self.run_cache: dict[tuple, dict[str, Any]] = {}
        # the C gradient copy's plan (_grads._native_plan): NOT_PLANNED until made, None where it does not apply
        self.native_copy_plan: Any = NOT_PLANNED

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [flat[o:o + n].view(p.shape) for p, o, n in zip(self.params, self.offsets, self.numels)]

    def state_view(self, key: str, value: float | Blockwise, i: int) -> torch.Tensor:
        """Parameter ``i``'s part of state buffer ``key``: shaped as the parameter (one element per
        element), or 1-D (one per block: ``per`` > 1)."""
        block = spec(value, self.dtype).block
        o = self.offsets[i]
        if block is None:
            return self.flat_state[key][o:o + self.numels[i]].view(self.params[i].shape)
        return self.flat_state[key][o // block:(o + self.padded[i]) // block]

    def ensure_grad_buffer(self) -> None:
        if self.flat_grad is None:
            self.flat_grad = flat_buffer(self.total, self.device, self.dtype, zero=True)
            self.grad_views = self.views(self.flat_grad)

    def span(self, start: int, end: int) -> int:
        """How many buffer elements parameters ``start:end`` span (with their alignment gaps)."""
        return self.offsets[end - 1] + self.padded[end - 1] - self.offsets[start] if end > start else 0

    def slices(self, init: dict[str, float], start: int, end: int,
               grad: bool = True) -> dict[str, torch.Tensor | None]:
        """The buffers' slices for parameters ``start:end`` (``grad``: with the gradient buffer's), in the
        order an update takes them: param, grad, then the state in ``init``'s order. Cached: every step asks
        for the same slices (the whole buffers, or the runs around large gradients read in place)."""
        keys = tuple(init)
        key = (keys, start, end, grad)
        run = self.run_cache.get(key)
        if run is None:
            self.ensure_state(init)
            lo = self.offsets[start]
            hi = lo + self.span(start, end)
            run = {"param": self.flat_param[lo:hi]}
            if grad:
                self.ensure_grad_buffer()
                run["grad"] = self.flat_grad[lo:hi]
            else:
                run["grad"] = None  # the caller's, in this position
            for k in keys:
                per = spec(init[k], self.dtype).per
                run[k] = self.flat_state[k][lo // per:hi // per]
            self.run_cache[key] = run
        return run

    def moved(self) -> bool:
        # a new dtype or device means a new allocation, hence a new address
        # (map over the C methods: this runs every step, for every parameter)
        return list(map(_data_ptr, self.params)) != self.param_ptrs


def runs(present: list[bool] | None, steps: list[Any]) -> list[tuple[int, int]]:
    """Cut a bucket into runs of neighbours that all have gradients (``present``: None = all do) and share
    a step count (``steps``: each parameter's, or ``run_keys``' tuples); each run is one update call on a
    slice of the buffers."""
    n = len(steps)
    out, start = [], None
    for i in range(n):
        if present is not None and not present[i]:
            if start is not None:
                out.append((start, i))
            start = None
        elif start is None:
            start = i
        elif steps[i] != steps[start]:
            out.append((start, i))
            start = i
    if start is not None:
        out.append((start, n))
    return out
