"""bfloat16 optimizer state for float32 parameters, stored with stochastic rounding; and Kahan-compensated
bfloat16/float16 parameters (``kahan_sum=True``, :func:`kahan_update`).

``kernels.Adam(..., state_dtype=torch.bfloat16)`` keeps ``exp_avg`` and ``exp_avg_sq`` in bfloat16 (4 bytes
per parameter instead of 8). The update computes in float32; storing rounds each moment to one of its two
bfloat16 neighbours with probability proportional to the distance (stochastic rounding: unbiased). Round to
nearest would not do: bfloat16 has 8 significant bits, so ``v * 0.999`` rounds back to ``v`` and a second
moment never decays (Zamirai et al. 2020; torchao's ``bf16_stochastic_round``).

The random bits are a hash of the element's position in its buffer and the step count, not a random
generator's draw: a run is reproducible, and the tests reproduce it bit for bit in plain torch ops. The
hash (32-bit, on int64 tensors so no operation overflows): ``x = (i + step * 0x9E3779B) mod 2^32``, then
``x ^= x >> 16; x = x * 0x7FEB352D mod 2^32; x ^= x >> 15; x = x * 0x2C1B3C6D mod 2^32; x ^= x >> 16``; its
low 16 bits (for ``exp_avg``; the high 16 for ``exp_avg_sq``) are added to the float32 bits and the low half
is cut off. NaN and inf are rounded to nearest.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, Any

import torch

from .._runtime import native as _native
from .._runtime.compile import run_fused
from .._runtime.dtensor import is_dtensor
from .._runtime.layout import Blockwise, scalars_tensor
from .accelerators import accelerator
from .kahan import KAHAN, check_kahan_sum, kahan_kind, kahan_update
from .q8math import Q8Scalars, _sqrt, decayed

if TYPE_CHECKING:
    from .._runtime.layout import Bucket

_MASK32 = 0xFFFFFFFF
BF16_STATE = "bf16-state"


#: the ``state`` argument's values: the parameters' dtype (torch's), bfloat16, block-wise 8-bit
STATES = ("param", "bf16", "8bit")


def check_state_dtype(owner: str, state_dtype: Any, amsgrad: bool, state: Any = "param") -> Any:
    """The state dtype that ``state`` (``"param"``/``"bf16"``; ``"8bit"`` never gets here: the constructor
    made an 8-bit optimizer) and ``state_dtype`` ask for together, or a ValueError naming the conflict."""
    if state not in STATES:
        raise ValueError(f"{owner}: state must be one of {', '.join(map(repr, STATES))} (got {state!r})")
    if state == "bf16":
        if state_dtype not in (None, torch.bfloat16):
            raise ValueError(f"{owner}: state='bf16' and state_dtype={state_dtype!r} disagree; give one of them")
        state_dtype = torch.bfloat16
    if state_dtype is not None and state_dtype is not torch.bfloat16:
        raise ValueError(f"{owner}: state_dtype must be None (the parameters' dtype, as torch.optim) or "
                         f"torch.bfloat16, got {state_dtype!r}; for 8-bit state use kernels.Adam8bit/AdamW8bit")
    if state_dtype is torch.bfloat16 and amsgrad:
        raise ValueError(f"{owner}: amsgrad=True with state_dtype=torch.bfloat16 is not supported")
    return state_dtype


def precision_options(owner: str, state: Any, state_dtype: Any, kahan_sum: Any, amsgrad: bool = False) -> dict:
    """The checked group options for ``state``/``state_dtype``/``kahan_sum``: only those set (torch loads ours)."""
    state_dtype, _ = check_state_dtype(owner, state_dtype, amsgrad, state), check_kahan_sum(owner, kahan_sum)
    return {**({"state_dtype": state_dtype} if state_dtype is not None else {}), **({"kahan_sum": True} if kahan_sum else {})}


def eight_bit_form(float_cls: type, eight_bit_cls: type) -> None:
    """``float_cls(..., state="8bit")`` builds ``eight_bit_cls`` with the same arguments."""
    float_cls._eight_bit = eight_bit_cls


def bf16_state_kind(owner: str, p: torch.Tensor, group: dict[str, Any], where: str) -> str | None:
    """The bucket kind of a parameter whose group asks for bfloat16 state (None: its own dtype's state)."""
    if group.get("state_dtype") is not torch.bfloat16 or p.dtype == torch.bfloat16:
        return None  # bfloat16 parameters keep bfloat16 state anyway, exactly as torch.optim does
    if p.dtype != torch.float32 or is_dtensor(p):
        what = "a DTensor" if is_dtensor(p) else str(p.dtype)
        raise ValueError(f"{owner}: {where} is {what}; state_dtype=torch.bfloat16 serves float32 (and "
                         "bfloat16) parameters that are not DTensors")
    return BF16_STATE


class BF16State:
    """Mixin: ``state_dtype=torch.bfloat16`` for an optimizer's float32 parameters, and ``kahan_sum=True``
    for its bfloat16/float16 ones. A subclass sets ``_bf16_update`` (a compiled-able function of ``(hp,
    *flags, p, g, *states, salt)``) and ``_kahan_update`` (of ``(hp, *flags, p, g, *states, kahan_comp)``,
    calling :func:`kahan_update`), and calls :func:`check_state_dtype` and :func:`check_kahan_sum` in
    ``__init__`` (``defaults["state_dtype"]``/``defaults["kahan_sum"]`` only when set)."""

    _bf16_update: Any = None
    _kahan_update: Any = None

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        # state="8bit": the optimizer's 8-bit form (AdamW -> AdamW8bit), built from the same arguments
        if kwargs.get("state") != "8bit" or getattr(cls, "_q8_update", None) is not None:
            return super().__new__(cls)
        target = cls.__dict__.get("_eight_bit")  # the class's own: a user's subclass has none to inherit
        if target is None:
            raise ValueError(f"{cls.__name__}: state='8bit' is not available for this class (8-bit forms: "
                             "kernels.Adam, AdamW, SGD, RMSprop, Adagrad, Lion)")
        if kwargs.get("kahan_sum"):
            raise ValueError(f"{cls.__name__}: kahan_sum=True with state='8bit' is not supported yet")
        obj = super().__new__(target)
        if not isinstance(obj, cls):  # (Python initializes it itself when it is an instance of cls)
            target.__init__(obj, *args, **kwargs)
        return obj

    def _bucket_kind(self, p: torch.Tensor, group: dict[str, Any], where: str) -> Any:
        kind = kahan_kind(type(self).__name__, p, group, where)
        if kind is not None:
            return kind
        if not self._state_init(group):  # SGD without momentum keeps no state at all
            return None
        return bf16_state_kind(type(self).__name__, p, group, where)

    def _new_bucket(self, group_index: int, params: list, positions: list, device: torch.device, kind: Any):
        bucket = super()._new_bucket(group_index, params, positions, device, kind)
        bucket.bf16_state = kind == BF16_STATE
        bucket.kahan = kind == KAHAN
        return bucket

    def _bucket_init(self, bucket: Bucket, group: dict[str, Any]) -> dict[str, Any]:
        init = self._state_init(group)
        if getattr(bucket, "bf16_state", False):
            return {k: Blockwise(v, torch.bfloat16) for k, v in init.items()}
        if getattr(bucket, "kahan", False):
            return {**init, "kahan_comp": 0.0}
        return init

    def _import_state(self, bucket: Bucket, i: int, old: dict[str, Any], init: dict[str, Any],
                      group: dict[str, Any]) -> dict[str, torch.Tensor]:
        if getattr(bucket, "kahan", False) and old.get("kahan_comp") is None:
            # a checkpoint without compensation (torch's, or ours without kahan_sum): it starts at 0, exactly
            old = {**old, "kahan_comp": torch.zeros_like(bucket.params[i])}
        return super()._import_state(bucket, i, old, init, group)

    def _step_bucket(self, bucket: Any) -> None:
        if not getattr(bucket, "kahan", False):
            super()._step_bucket(bucket)
            return
        # an in-place edit of a parameter through autograd's view of it (under torch.no_grad(): a clamp, a
        # projection, reset_parameters(), model.load_state_dict()) bumps its version counter; our own writes go
        # through the flat buffer and do not. The edited parameter's compensation belongs to the old values.
        versions = [p._version for p in bucket.params]
        seen = getattr(bucket, "kahan_versions", None)
        if seen is not None:
            for p, now, then in zip(bucket.params, versions, seen):
                if now != then and "kahan_comp" in self.state.get(p, {}):
                    self.state[p]["kahan_comp"].zero_()
        super()._step_bucket(bucket)
        bucket.kahan_versions = versions

    def _apply(self, s: Any, hp: Any, flags: tuple, run: dict[str, torch.Tensor], bucket: Bucket) -> None:
        if getattr(bucket, "bf16_state", False):
            step_bf16_state(self, s, flags, run, bucket)
        elif getattr(bucket, "kahan", False):
            p, g, comp = run["param"], run["grad"], run["kahan_comp"]
            states = tuple(v for k, v in run.items() if k not in ("param", "grad", "kahan_comp"))
            if hp is not None and run_fused(type(self)._kahan_update, flags, (p, g, *states, comp), hp,
                                            strict=self._fused_strict)[0]:
                return
            kahan_update(type(self)._eager_update, s, flags, p, g, states, comp)
        else:
            super()._apply(s, hp, flags, run, bucket)


def _generic_step(opt: Any, s: Any, flags: tuple, run: dict[str, torch.Tensor], start: int, bucket: Bucket) -> None:
    p = run["param"]
    hp = scalars_tensor(s, p)
    salt = torch.tensor([bucket.current_step, start], dtype=torch.int64, device=p.device)
    states = tuple(v for k, v in run.items() if k not in ("param", "grad"))
    tensors = (p, run["grad"], *states, salt)
    fn = type(opt)._bf16_update
    if opt._fused and run_fused(fn, flags, tensors, hp, strict=opt._fused_strict)[0]:
        return
    fn(hp, *flags, *tensors)


def _native_ok(run: dict[str, torch.Tensor]) -> Any:
    """The C library where it can serve this run (the CPU, a contiguous float32 gradient), else None."""
    p, g = run["param"], run["grad"]
    if p.device.type != "cpu" or g.dtype != torch.float32 or not g.is_contiguous():
        return None
    return _native.available()


def rmsprop_bf16_native(s: Any, flags: tuple, run: dict[str, torch.Tensor], start: int, step: int) -> bool:
    """RMSprop's bfloat16-state step by the C kernel (an accelerator of ``_rmsprop_fused``; False where it
    cannot serve)."""
    lib = _native_ok(run)
    if lib is None:
        return False
    n = run["grad"].numel()
    hp32 = _native.floats(tuple(s))
    ptr = {k: v.data_ptr() for k, v in run.items()}
    maximize, decay, use_momentum, centered = flags
    lib.rmsprop_bf16state(ptr["param"], ptr["grad"], ptr["square_avg"], ptr.get("momentum_buffer"),
                          ptr.get("grad_avg"), n, start, step, ctypes.addressof(hp32), int(maximize),
                          int(decay), int(use_momentum), int(centered), _native.threads(n))
    return True


def sgd_bf16_native(s: Any, flags: tuple, run: dict[str, torch.Tensor], start: int, step: int) -> bool:
    """SGD-with-momentum's bfloat16-state step by the C kernel (an accelerator of ``_sgd_fused``; without
    momentum there is no state and no bfloat16 bucket)."""
    lib = _native_ok(run)
    if lib is None:
        return False
    n = run["grad"].numel()
    hp32 = _native.floats(tuple(s))
    maximize, decay, _, nesterov = flags
    lib.sgd_bf16state(run["param"].data_ptr(), run["grad"].data_ptr(), run["momentum_buffer"].data_ptr(), n,
                      start, step, ctypes.addressof(hp32), int(maximize), int(decay), int(nesterov),
                      _native.threads(n))
    return True


def step_bf16_state(opt: Any, s: Any, flags: tuple, run: dict[str, torch.Tensor], bucket: Bucket) -> None:
    """One run's update: on the CPU the C kernel (``_native.c``, the same bits), else the torch ops,
    compiled when the optimizer's ``fused`` allows."""
    p = run["param"]
    if type(opt)._bf16_update is not None:  # every optimizer but Adam: its own update on float32 copies
        start = p.storage_offset() - bucket.flat_param.storage_offset()
        native = accelerator(type(opt)._fused_update, "bf16")  # registered per update; None: torch ops
        if not (opt._fused and native is not None and native(s, flags, run, start, bucket.current_step)):
            _generic_step(opt, s, flags, run, start, bucket)
        return
    _, maximize, wd_mode = flags
    q = Q8Scalars(s.step_size, s.one_minus_beta1, s.beta2, s.one_minus_beta2, s.weight_decay, s.decay_factor,
                  1.0 / s.bc2_sqrt, s.eps, 0.0)
    start = p.storage_offset() - bucket.flat_param.storage_offset()
    g, m, v = run["grad"], run["exp_avg"], run["exp_avg_sq"]
    if opt._fused and p.device.type == "cpu" and g.dtype == torch.float32 and g.is_contiguous():
        lib = _native.available()
        if lib is not None:
            n = g.numel()
            hp32 = _native.floats(q)
            if lib.adam_bf16state(p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), n, start,
                                  bucket.current_step, ctypes.addressof(hp32), int(maximize), wd_mode,
                                  _native.threads(n)):
                raise RuntimeError(f"adam_bf16state: no C kernel for weight-decay mode {wd_mode}")
            return
    hp = scalars_tensor(q, p)
    salt = torch.tensor([bucket.current_step, start], dtype=torch.int64, device=p.device)
    tensors = (p, g, m, v, salt)
    if opt._fused and run_fused(adam_bf16_state_update, (maximize, wd_mode), tensors, hp,
                                strict=opt._fused_strict)[0]:
        return
    adam_bf16_state_update(hp, maximize, wd_mode, *tensors)


# pragma: no mutate start (compiled by torch.compile, which cannot trace mutmut's trampolines: the hash
# and the rounding too, or every compiled bfloat16-state update falls back to eager under mutmut)
def random_bits(index: torch.Tensor, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two sets of 16 pseudo-random bits per element (int32 in [0, 65535]: the hash's low and high halves)
    from int64 positions and the step count."""
    x = (index + step * 0x9E3779B) & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _MASK32
    x = x ^ (x >> 16)
    return (x & 0xFFFF).to(torch.int32), (x >> 16).to(torch.int32)


def stochastic_round(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """float32 ``x`` to bfloat16, rounded up in magnitude with probability (dropped part) / ulp."""
    kept = (x.view(torch.int32) + bits) & -65536  # -65536 = 0xFFFF0000 as int32
    return torch.where(x.abs() < float("inf"), kept.view(torch.float32), x).to(torch.bfloat16)


def bf16_state_update(fused_update: Any, hp: torch.Tensor, flags: tuple, p, g, states: tuple, salt):
    """Any optimizer's float32 update (its ``_fused_update``) on float32 copies of bfloat16 state, stored
    back with stochastic rounding: state ``j`` takes the low (even ``j``) or high (odd ``j``) half of the
    hash at step ``step + (j // 2) * 2^30``. Compiled, the copies stay in registers."""
    f32 = [None if t is None else t.float() for t in states]
    fused_update(hp, *flags, p, g, *f32)
    index = torch.arange(p.shape[0], device=p.device, dtype=torch.int64) + salt[1]
    present = [(t, f) for t, f in zip(states, f32) if t is not None]
    for j in range(0, len(present), 2):
        halves = random_bits(index, salt[0] + (j // 2) * (1 << 30))
        for (t, f), bits in zip(present[j:j + 2], halves):
            t.copy_(stochastic_round(f, bits))


def adam_bf16_state_update(hp: torch.Tensor, maximize: bool, wd_mode: int, p, g, m, v, salt):
    """One Adam step of float32 ``p`` with bfloat16 moments ``m``, ``v`` (1-D slices); ``salt``: int64
    ``[step, position of the slice's first element in its buffer]``. ``hp``: :class:`Q8Scalars` (float32)."""
    s = Q8Scalars(*hp.unbind())
    pf, gf = decayed(s, maximize, wd_mode, p.float(), g.float())
    mf = m.float()
    mn = mf + s.one_minus_beta1 * (gf - mf)
    vn = v.float() * s.beta2 + s.one_minus_beta2 * (gf * gf)
    denom = _sqrt(vn) * s.inv_bc2_sqrt + s.eps
    p.copy_(pf - (s.step_size * mn) / denom)
    low, high = random_bits(torch.arange(p.shape[0], device=p.device, dtype=torch.int64) + salt[1], salt[0])
    m.copy_(stochastic_round(mn, low))
    v.copy_(stochastic_round(vn, high))
# pragma: no mutate end
