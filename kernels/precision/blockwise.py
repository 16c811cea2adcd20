"""Block-wise 8-bit optimizer state as a mixin: which parameters are quantized, the block-aligned layout,
checkpoints in both directions, and the choice of path for a step (a C kernel registered for the
optimizer, its hand-written torch-op twin, or the 8-bit codec around the optimizer's declared update).

The codes and their maps are in ``kernels.precision.q8math``; the codec in :mod:`.codecs`; the CPU kernels in
``kernels/_runtime/native.c``. The optimizers built on it: ``kernels.optim.eightbit`` (Adam8bit, AdamW8bit, SGD8bit,
RMSprop8bit), ``kernels.optim.adagrad`` (Adagrad8bit), ``kernels.optim.lion`` (Lion8bit).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from .._runtime import native as _native
from .._runtime.compile import run_fused
from .._runtime.dtensor import is_dtensor
from .._runtime.layout import Blockwise, Bucket, scalars_tensor
from .._runtime.state import import_float_state
from .accelerators import accelerator
from .q8math import CODE_DTYPES, check_codes, dequantize, quantize

MAX_BLOCK = 4096  # _native.c keeps a block in two stack arrays of this many floats
_NATIVE_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
#: elements per call of a torch-op 8-bit update (a multiple of every block size up to MAX_BLOCK)
Q8_CHUNK = 1 << 18
_LIMITS = {"block_size": (1, MAX_BLOCK), "min_8bit_size": (0, None)}


def _check_int(what: str, value: Any, low: int, high: int | None) -> None:
    if (not isinstance(value, int) or isinstance(value, bool) or value < low
            or (high is not None and value > high)):
        raise ValueError(f"{what} must be an int in [{low}, {high if high is not None else 'inf'}] "
                         f"(got {value!r})")


class Blockwise8bit:
    """Mixin (first base, before the float optimizer whose update it quantizes): the state keys in the
    class's ``_code_dtypes`` are kept as 8-bit codes (int8 signed, uint8 non-negative) with a float32 absmax
    per block, for every parameter of at least ``min_8bit_size`` elements; smaller ones keep the float
    optimizer's state and update. A subclass declares ``_q8_update``: the 8-bit codec around its float
    optimizer's declared update (``codecs.blockwise_8bit``), or a hand-written torch-op twin of a C kernel
    whose op order differs from the declared update's (Adam's, RMSprop's: then ``_q8_scalars`` and
    ``_q8_flags`` too); a C kernel, where one exists, is found in the accelerator table by the declared
    update. It calls :meth:`_q8_setup` first thing in ``__init__``."""

    #: the codec stores the state with stochastic rounding (a codec ``_q8_update`` only; see ``blockwise_8bit``)
    _q8_stochastic: ClassVar[bool] = False
    _q8_update: ClassVar[Callable[..., None]]
    _code_dtypes: ClassVar[dict[str, torch.dtype]]

    def _q8_setup(self, block_size: Any, min_8bit_size: Any, state: Any = "8bit") -> None:
        name = type(self).__name__
        if state != "8bit":
            raise ValueError(f"{name}: keeps 8-bit state (state='8bit'), got state={state!r}; for other state "
                             f"use kernels.{name.removesuffix('8bit')}")
        _check_int(f"{name}: block_size", block_size, *_LIMITS["block_size"])
        _check_int(f"{name}: min_8bit_size", min_8bit_size, *_LIMITS["min_8bit_size"])
        self._more_defaults = dict(block_size=block_size, min_8bit_size=min_8bit_size)

    def _q8_scalars(self, s: Any) -> tuple[float, ...]:
        """The float optimizer's step scalars ``s`` as the 8-bit update's (``_q8math``'s NamedTuples)."""
        raise NotImplementedError

    def _q8_flags(self, flags: tuple) -> tuple[bool, int, bool]:
        """The float optimizer's flags as ``(maximize, weight-decay mode, the kind's own flag)``."""
        raise NotImplementedError

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if isinstance(param_group, dict):
            for key in ("block_size", "min_8bit_size"):
                if key in param_group:
                    _check_int(f"{type(self).__name__}: parameter group {len(self.param_groups)}: {key}",
                               param_group[key], *_LIMITS[key])
        super().add_param_group(param_group)

    # ---- layout: which parameters are quantized, in buckets aligned to the block size ---------------------
    def _bucket_kind(self, p: torch.Tensor, group: dict[str, Any], where: str) -> Any:
        if not self._state_init(group):  # SGD without momentum keeps no state: nothing to quantize
            return None
        name = type(self).__name__
        if p.is_complex() or p.dtype == torch.float64:
            raise ValueError(f"{name}: {where} is {p.dtype}; 8-bit state serves float32, bfloat16 and float16 "
                             f"parameters (use kernels.{name.removesuffix('8bit')} for float64 and complex ones)")
        if is_dtensor(p):
            raise ValueError(f"{name}: {where} is a DTensor; 8-bit state does not support FSDP2/DTensor "
                             f"parameters yet (use kernels.{name.removesuffix('8bit')})")
        return p.numel() >= int(group["min_8bit_size"])

    def _new_bucket(self, group_index: int, params: list[torch.Tensor], positions: list[int],
                    device: torch.device, kind: Any) -> Bucket:
        if not kind:
            return super()._new_bucket(group_index, params, positions, device, kind)
        block = int(self.param_groups[group_index]["block_size"])
        direct = self.direct_grad_min_numel if device.type == "cpu" else self.direct_grad_min_numel_accelerator
        bucket = Bucket(group_index, params, positions, direct, align=block)
        bucket.quantized = True
        return bucket

    def _bucket_init(self, bucket: Bucket, group: dict[str, Any]) -> dict[str, Any]:
        if not getattr(bucket, "quantized", False):
            return super()._bucket_init(bucket, group)
        block = bucket.align
        if group["block_size"] != block:
            raise ValueError(f"{type(self).__name__}: param_groups[{bucket.group_index}]['block_size'] was "
                             f"changed from {block} to {group['block_size']!r} after construction; the state "
                             "is laid out in blocks of the first, so build a new optimizer to change it")
        init = {}
        for key, fill in self._state_init(group).items():  # torch's order, each key followed by its scales
            # a state that starts at a value (Adagrad's initial_accumulator_value): every code at the top of the
            # map and the scale that value, which decodes to it exactly
            top = 0.0 if fill == 0 else (255.0 if self._code_dtypes[key] == torch.uint8 else 127.0)
            init[key] = Blockwise(top if fill >= 0 else -top, self._code_dtypes[key])
            init[key + "_absmax"] = Blockwise(abs(float(fill)), torch.float32, block)
        return init

    def _import_state(self, bucket: Bucket, i: int, old: dict[str, Any], init: dict[str, Any],
                      group: dict[str, Any]) -> dict[str, torch.Tensor]:
        if not getattr(bucket, "quantized", False):
            return import_float_state(self, bucket, i, old, init, group)
        out = {}
        where = f"state for parameter {bucket.positions[i]} of group {bucket.group_index}"
        for key in self._state_init(group):
            code_dtype = self._code_dtypes[key]
            value = old.get(key)
            if value is None:
                raise ValueError(f"{where} lacks {key!r}, which {type(self).__name__} needs")
            if value.dtype in CODE_DTYPES:
                if value.dtype != code_dtype:
                    raise ValueError(f"{where}: {key!r} holds {value.dtype} codes; this optimizer stores "
                                     f"{key!r} as {code_dtype}")
                scale = old.get(key + "_absmax")
                if scale is None:
                    raise ValueError(f"{where}: {key!r} holds 8-bit codes but {key + '_absmax'!r} is missing")
                out[key], out[key + "_absmax"] = value, scale
            else:  # float state (torch's, or a float bucket's): quantized as a step would store it
                out[key], out[key + "_absmax"] = quantize(value, bucket.align, code_dtype)
        return out

    # ---- the step -----------------------------------------------------------------------------------------
    def _apply(self, s: Any, hp: torch.Tensor | None, flags: tuple, run: dict[str, torch.Tensor],
               bucket: Bucket) -> None:
        if not getattr(bucket, "quantized", False):
            super()._apply(s, hp, flags, run, bucket)
            return
        p, g = run["param"], run["grad"]
        state = tuple(v for k, v in run.items() if k not in ("param", "grad"))
        block = bucket.align
        native = accelerator(type(self)._fused_update, "8bit")  # a C kernel registered for this update
        if self._fused and native is not None and native(self, s, flags, run, block):
            return
        fn = type(self)._q8_update
        codec = getattr(fn, "codec", False)
        if codec:
            # the codec around the optimizer's declared update, in torch ops (compiled where ``fused`` allows)
            signed = tuple(t.dtype == torch.int8 for t in state[0::2])
            fl, hp = (flags, str(block), signed), scalars_tensor(s, p)  # (a constant: see codecs.blockwise_8bit)
        else:  # a hand-written torch-op twin of the C kernel (Adam8bit's, RMSprop8bit's: their own op order)
            maximize, wd_mode, extra = self._q8_flags(flags)
            fl, hp = (maximize, wd_mode, extra, str(block)), scalars_tensor(self._q8_scalars(s), p)
        # in chunks of whole blocks: the torch ops keep a run's decoded state in temporaries, and at the size of
        # a whole bucket these are fresh mappings every call (ResNet-50's shapes: 124 ms a Lion8bit step in one
        # call, against 18 for a 10M tensor); a chunk's temporaries are reused. Blocks are independent: the
        # same numbers
        origin = p.storage_offset() - bucket.flat_param.storage_offset()
        for a in range(0, max(p.numel(), 1), Q8_CHUNK):
            b = min(a + Q8_CHUNK, p.numel())
            part = [t[a:b] if i % 2 == 0 else t[a // block:-(-b // block)] for i, t in enumerate(state)]
            if codec and self._q8_stochastic:  # the rounding's seed: the step and the chunk's place in its buffer
                part.append(torch.tensor([bucket.current_step, origin + a], dtype=torch.int64, device=p.device))
            tensors = (p[a:b], g[a:b], *part)
            if not (self._fused and run_fused(fn, fl, tensors, hp, strict=self._fused_strict)[0]):
                fn(hp, *fl, *tensors)


def q8_native(kind: int) -> Callable[..., bool]:
    """The accelerator (``accelerators.register_accelerator(update, "8bit", ...)``) that runs ``_native.c``'s
    ``q8_step`` of ``kind`` (0 Adam/AdamW, 1 SGD, 2 RMSprop) on the CPU for float32 and bfloat16 parameters;
    False (the torch-op path then runs, with the same numbers) elsewhere or without a C compiler."""

    def run(opt: Any, s: Any, flags: tuple, buffers: dict[str, torch.Tensor], block: int) -> bool:
        p, g = buffers["param"], buffers["grad"]
        if p.device.type != "cpu" or p.dtype not in _NATIVE_DTYPES or not g.is_contiguous():
            return False
        lib = _native.available()
        if lib is None:
            return False
        state = [t for k, t in buffers.items() if k not in ("param", "grad")]
        maximize, wd_mode, extra = opt._q8_flags(flags)
        n = g.numel()
        hp32 = _native.floats(opt._q8_scalars(s))
        if lib.q8_step(kind, p.data_ptr(), g.data_ptr(), _NATIVE_DTYPES[p.dtype],
                       *([t.data_ptr() for t in state] + [None] * (4 - len(state))), n, block,
                       ctypes.addressof(hp32), int(maximize), wd_mode, int(extra), _native.threads(n)):
            raise RuntimeError(f"{type(opt).__name__}: the C kernel has no entry for kind {kind}, weight-decay "
                               f"mode {wd_mode}")
        return True

    run.__qualname__ = run.__name__ = f"q8_native_{kind}"
    return run


def dequantize_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A copy of an 8-bit optimizer's ``state_dict()`` with every quantized state tensor as float32 (its
    ``*_absmax`` scales dropped), which ``torch.optim.Adam``/``AdamW``/``SGD``/``RMSprop`` load. Float state
    is kept as is."""
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError("dequantize_state_dict needs an optimizer state_dict (keys 'state' and 'param_groups')")
    block_of = {pid: g.get("block_size") for g in state_dict["param_groups"] for pid in g["params"]}
    state = {}
    for pid, entry in state_dict["state"].items():
        new = {}
        for key, value in entry.items():
            if key.endswith("_absmax"):
                continue
            if isinstance(value, torch.Tensor) and value.dtype in CODE_DTYPES:
                scale = entry.get(key + "_absmax")
                # the checks (and messages) a loading 8-bit optimizer applies: scales and block size present,
                # one scale per block; either code dtype is read as what it is
                check_codes(f"state of parameter {pid}", key, value, scale, block_of.get(pid), value.numel(),
                            value.dtype)
                value = dequantize(value, scale, block_of[pid])
            new[key] = value
        state[pid] = new
    groups = [{k: v for k, v in g.items() if k not in ("block_size", "min_8bit_size")}
              for g in state_dict["param_groups"]]
    return {"state": state, "param_groups": groups}
