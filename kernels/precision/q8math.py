"""Block-wise 8-bit optimizer state: the codes, their scales, and the 8-bit Adam and RMSprop updates, in
torch ops (SGD8bit's is the 8-bit codec around SGD's own update: ``codecs.blockwise_8bit``).

A moment tensor is cut into blocks of ``block`` elements (each parameter starts a new block; see
``_layout.Bucket``'s ``align``). Each block keeps one float32 scale, the largest finite magnitude in it
(``absmax``), and one 8-bit code per element:

- the first moment (signed), int8 ``c`` in [-127, 127]: ``m = sign(c) (c/127)^2 absmax``;
- the second moment (non-negative), uint8 ``c`` in [0, 255]: ``v = ((c+1)/256)^2 absmax``.

Both maps are square-root companding (a code is the rounded square root of the normalized value), which
puts more levels near zero, where most moments of a block are (Dettmers et al. 2022 use a non-linear
"dynamic" map for the same reason). The second moment's levels exclude zero: its smallest level is
``absmax/65536``, so a small ``v`` is over-estimated rather than rounded to 0, and the Adam denominator
never collapses to ``eps`` (Li et al. 2023 make the same choice for 4-bit state). A non-finite moment is
stored as code 0 and left out of its block's scale: the parameter element itself has already become
NaN/inf in that step (as it does with torch's Adam), and nothing spreads to its block or other blocks.

Arithmetic is float32 and ordered exactly as ``_native.c`` does it; square roots go through float64 (torch's
float32 ``sqrt`` on the CPU is not correctly rounded, C's ``sqrtf`` is) and scalars are multiplied, never
divided (torch divides a tensor by a Python scalar as a product by its reciprocal). So the CPU kernel and
this code give the same bits, and the tests hold both to a plain reference.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

INV_127_SQ = 1.0 / 16129.0
CODE_DTYPES = {torch.int8: "first moment (signed)", torch.uint8: "second moment (non-negative)"}


class RMSprop8Scalars(NamedTuple):  # _rmsprop.RMSpropScalars, then 1/127^2
    lr: float
    alpha: float
    one_minus_alpha: float
    eps: float
    weight_decay: float
    momentum: float
    inv_127_sq: float


class Q8Scalars(NamedTuple):
    step_size: float        # lr / (1 - beta1^t)
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    weight_decay: float
    decay_factor: float     # 1 - lr * weight_decay (decoupled)
    inv_bc2_sqrt: float     # 1 / sqrt(1 - beta2^t)
    eps: float
    inv_127_sq: float


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 square root (as C's sqrtf): through float64, exact after rounding."""
    return x.double().sqrt().to(x.dtype)


def encode_first(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (int8) and scales of float32 first moments laid out as (blocks, block)."""
    a = m.abs()
    finite = a < float("inf")
    am = torch.where(finite, a, 0.0).amax(1, keepdim=True)
    km = torch.where(am > 0, torch.full_like(am, 127.0) / _sqrt(am), 0.0)
    c = torch.round(_sqrt(a) * km).clamp(max=127.0)
    c = torch.where(finite, c, 0.0)
    c = torch.where(m < 0, -c, c)
    return c.to(torch.int8), am.view(-1)


def encode_second(v: torch.Tensor, root: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (uint8) and scales of float32 second moments ``v`` (with ``root`` = their square roots), laid
    out as (blocks, block)."""
    finite = v < float("inf")
    av = torch.where(finite, v, 0.0).amax(1, keepdim=True)
    kv = torch.where(av > 0, torch.full_like(av, 256.0) / _sqrt(av), 0.0)
    d = (torch.round(root * kv) - 1.0).clamp(0.0, 255.0)
    d = torch.where(finite, d, 0.0)
    return d.to(torch.uint8), av.view(-1)


def decode_first(codes: torch.Tensor, absmax: torch.Tensor, inv_127_sq) -> torch.Tensor:
    q = codes.float()
    return (q * q.abs()) * (absmax * inv_127_sq).view(-1, 1)


def decode_second(codes: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    t = codes.float() + 1.0
    return (t * t) * (absmax * (1.0 / 65536.0)).view(-1, 1)


def blocks(flat: torch.Tensor, block: int) -> torch.Tensor:
    """A 1-D tensor as (blocks, block), zero-padded at the end (a copy only when padding is needed)."""
    n = flat.numel()
    pad = -n % block
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, block)


def quantize(x: torch.Tensor, block: int, code_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A float moment tensor (any shape) as 8-bit codes shaped like it and one float32 scale per block."""
    xb = blocks(x.detach().reshape(-1).float(), block)
    if code_dtype == torch.int8:
        codes, scale = encode_first(xb)
    else:
        xb = xb.clamp_min(0.0)
        codes, scale = encode_second(xb, _sqrt(xb))
    return codes.view(-1)[:x.numel()].view(x.shape), scale


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, block: int) -> torch.Tensor:
    """The float32 moments that codes and scales stand for, shaped like ``codes``."""
    cb = blocks(codes.reshape(-1), block)
    absmax = absmax.reshape(-1).float()
    out = decode_first(cb, absmax, INV_127_SQ) if codes.dtype == torch.int8 else decode_second(cb, absmax)
    return out.view(-1)[:codes.numel()].view(codes.shape)


def check_codes(where: str, key: str, codes: torch.Tensor, absmax: object, block: object, numel: int,
                expected: torch.dtype | None) -> None:
    """What a state dict's 8-bit state must satisfy before anything is loaded. ``expected``: the code dtype
    the loading optimizer reads ``key`` as (None: it has no 8-bit form of ``key``)."""
    if codes.dtype not in CODE_DTYPES:
        raise ValueError(f"{where}: {key!r} has dtype {codes.dtype}; state is floating point, or 8-bit codes "
                         "(int8 for a first moment, uint8 for a second moment) with a float32 scale per block")
    if codes.dtype != expected:
        raise ValueError(f"{where}: {key!r} holds {codes.dtype} codes, but this optimizer stores {key!r} "
                         + (f"as {expected}" if expected is not None else "only as floating point"))
    if not isinstance(absmax, torch.Tensor):
        raise ValueError(f"{where}: {key!r} holds 8-bit codes but {key + '_absmax'!r}, the per-block scales "
                         "needed to read them, is missing")
    if not isinstance(block, int) or isinstance(block, bool) or block < 1:
        raise ValueError(f"{where}: {key!r} holds 8-bit codes but the saved parameter group has no valid "
                         f"'block_size' (got {block!r}); it is needed to read them")
    blocks_needed = -(-numel // block)
    if absmax.numel() != blocks_needed or not absmax.is_floating_point():
        raise ValueError(f"{where}: {key + '_absmax'!r} must hold {blocks_needed} float scales (one per block "
                         f"of {block} elements), got {absmax.numel()} of dtype {absmax.dtype}")


# pragma: no mutate start (also compiled by torch.compile, which cannot trace mutmut's trampolines)
def decayed(s: Q8Scalars, maximize: bool, wd_mode: int, pf: torch.Tensor, gf: torch.Tensor):
    """Parameter and gradient in float32 after ``maximize`` and weight decay (1: L2 added to the gradient,
    2: decoupled, applied to the parameter), as the C kernels order them."""
    if maximize:
        gf = -gf
    if wd_mode == 1:
        gf = gf + s.weight_decay * pf
    elif wd_mode == 2:
        pf = pf * s.decay_factor
    return pf, gf


def _blocks_in(block: int, p: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Parameter and gradient slices in float32 as (blocks, block); ``g`` may be shorter than ``p`` (the
    gradient of one parameter read where it lies; the rest of its last block is zero)."""
    n = p.shape[0]
    gf = g.float()
    if gf.shape[0] != n:
        gf = torch.cat([gf, gf.new_zeros(n - gf.shape[0])])
    return p.float().view(-1, block), gf.view(-1, block)


def _store_first(m: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> None:
    c, a = encode_first(m)
    codes.copy_(c.view(-1))
    scales.copy_(a)


def _store_second(v: torch.Tensor, root: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> None:
    c, a = encode_second(v, root)
    codes.copy_(c.view(-1))
    scales.copy_(a)


# The updates below work on 1-D slices whose length is a multiple of ``block``; ``hp`` holds their scalars
# (a NamedTuple above) as a float32 tensor. Each uses this step's moments in float32; only what is stored is
# quantized (as bitsandbytes does).
def adam8bit_update(hp: torch.Tensor, maximize: bool, wd_mode: int, block: int, p, g, cm, sm, cv, sv):
    """One 8-bit Adam step: ``cm, sm`` the first moment's codes and scales, ``cv, sv`` the second's. ``block``
    may come as a string (a constant when compiled: see ``codecs.blockwise_8bit``)."""
    block = int(block)
    s = Q8Scalars(*hp.unbind())
    pf, gf = decayed(s, maximize, wd_mode, *_blocks_in(block, p, g))
    mo = decode_first(cm.view(-1, block), sm, s.inv_127_sq)
    vo = decode_second(cv.view(-1, block), sv)
    mn = mo + s.one_minus_beta1 * (gf - mo)
    vn = vo * s.beta2 + s.one_minus_beta2 * (gf * gf)
    root = _sqrt(vn)
    denom = root * s.inv_bc2_sqrt + s.eps
    p.copy_((pf - (s.step_size * mn) / denom).view(-1))
    _store_first(mn, cm, sm)
    _store_second(vn, root, cv, sv)


def rmsprop8bit_update(hp: torch.Tensor, maximize: bool, wd_mode: int, use_momentum: bool, block: int, p, g,
                       cv, sv, cb=None, sb=None):
    """One RMSprop step (not centered): ``cv, sv`` the square average's codes and scales (unsigned), ``cb,
    sb`` the momentum buffer's (signed, with momentum). ``v = alpha v + (1-alpha) g^2``, ``q = g /
    (sqrt(v) + eps)``; with momentum ``b = momentum b + q`` and the step ``lr * b``, else ``lr * q``."""
    block = int(block)
    s = RMSprop8Scalars(*hp.unbind())
    pf, gf = decayed(s, maximize, wd_mode, *_blocks_in(block, p, g))
    vn = decode_second(cv.view(-1, block), sv) * s.alpha + s.one_minus_alpha * (gf * gf)
    root = _sqrt(vn)
    q = gf / (root + s.eps)
    if use_momentum:
        bn = decode_first(cb.view(-1, block), sb, s.inv_127_sq) * s.momentum + q
        p.copy_((pf - s.lr * bn).view(-1))
        _store_first(bn, cb, sb)
    else:
        p.copy_((pf - s.lr * q).view(-1))
    _store_second(vn, root, cv, sv)
# pragma: no mutate end


# their background compile keeps the real sizes (``_runtime.compile._schedule``): they view buffers as blocks
for _fn in (adam8bit_update, rmsprop8bit_update):
    _fn.exact_shapes = True
    _fn.eager_cost = 6  # (codecs.EAGER_COST_8BIT: their eager steps cost as the codec's)
