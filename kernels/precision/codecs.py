"""The codecs: each turns an optimizer's declared float32 update into its variant for one state precision.

``update(hp, *flags, p, g, *state)`` is an optimizer's ``_fused_update``: elementwise, computing in
``hp``'s dtype and writing ``p`` and each state tensor with ``copy_``. A codec hands it float32 copies and
stores what it wrote in its own form. Each returned function has a ``__qualname__`` of its own
(``bf16_state[_lion_fused]``): the compile cache (``_compile.run_fused``) keys kernels by it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .bf16 import bf16_state_update, random_bits
from .kahan import kahan_update
from .q8math import INV_127_SQ, _blocks_in, _sqrt, decode_first, decode_second, encode_first, encode_second

#: eager time per element of an 8-bit update over an elementwise one's (measured on 2 cores, a 1.2M-parameter
#: MLP: Lion8bit's eager step 20 ms against Lion's 3.4): its background compile starts that much sooner
EAGER_COST_8BIT = 6


def _named(fn: Callable[..., Any], codec: str, update: Callable[..., Any]) -> Callable[..., Any]:
    fn.__name__ = fn.__qualname__ = f"{codec}[{update.__qualname__}]"
    fn.__module__ = update.__module__
    return fn


# pragma: no mutate start (compiled by torch.compile, which cannot trace mutmut's trampolines)
def _split(args: tuple) -> tuple[tuple, torch.Tensor, torch.Tensor, tuple]:
    """``(*flags, p, g, *tensors)`` as (flags, p, g, tensors): the flags are the leading non-tensors."""
    first = next(i for i, a in enumerate(args) if isinstance(a, torch.Tensor))
    return tuple(args[:first]), args[first], args[first + 1], tuple(args[first + 2:])


def bf16_state(update: Callable[..., Any]) -> Callable[..., Any]:
    """``update`` on bfloat16 state: ``(hp, *flags, p, g, *state, salt)``, ``salt`` = int64 ``[step,
    offset]`` seeding the stochastic rounding (``_bf16state.bf16_state_update``)."""

    def run(hp, *args):
        flags, p, g, rest = _split(args)
        bf16_state_update(update, hp, flags, p, g, rest[:-1], rest[-1])

    return _named(run, "bf16_state", update)


def kahan(update: Callable[..., Any]) -> Callable[..., Any]:
    """``update`` of a bfloat16/float16 parameter with Kahan compensation: ``(hp, *flags, p, g, *state,
    kahan_comp)`` (``_bf16state.kahan_update``)."""

    def run(hp, *args):
        flags, p, g, rest = _split(args)
        kahan_update(update, hp, flags, p, g, rest[:-1], rest[-1])

    return _named(run, "kahan", update)


def encode_first_stochastic(m: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """As ``_q8math.encode_first`` (int8 codes and per-block scales of signed (blocks, block) values), but each
    value rounded to one of its two neighbouring levels with probability proportional to the distance in
    *value* (levels are ``(c/127)^2 absmax``): unbiased, ``E[decoded] = m``. ``u``: uniform [0, 1) per
    element."""
    a = m.abs()
    finite = a < float("inf")
    am = torch.where(finite, a, 0.0).amax(1, keepdim=True)
    km = torch.where(am > 0, torch.full_like(am, 127.0) / _sqrt(am), 0.0)
    x = _sqrt(a) * km
    lo = torch.floor(x)
    hi = lo + 1.0
    span = hi * hi - lo * lo
    c = torch.where(u * span < x * x - lo * lo, hi, lo).clamp(max=127.0)
    c = torch.where(finite, c, 0.0)
    c = torch.where(m < 0, -c, c)
    return c.to(torch.int8), am.view(-1)


def encode_second_stochastic(v: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """As ``_q8math.encode_second`` (uint8 codes of non-negative (blocks, block) values, levels
    ``((d+1)/256)^2 absmax``), stochastically rounded between neighbouring levels by distance in value;
    values below the smallest level take it (the map has no zero)."""
    finite = v < float("inf")
    av = torch.where(finite, v, 0.0).amax(1, keepdim=True)
    kv = torch.where(av > 0, torch.full_like(av, 256.0) / _sqrt(av), 0.0)
    x = _sqrt(v) * kv  # the level index plus one, continuous
    lo = torch.floor(x)
    span = 2.0 * lo + 1.0  # (lo + 1)^2 - lo^2
    d = torch.where(u * span < x * x - lo * lo, lo, lo - 1.0).clamp(0.0, 255.0)
    d = torch.where(finite, d, 0.0)
    return d.to(torch.uint8), av.view(-1)


def blockwise_8bit(update: Callable[..., Any], stochastic: bool = False) -> Callable[..., Any]:
    """``update`` on block-wise 8-bit state: ``(hp, flags, block, signed, p, g, *codes_and_scales)`` with
    ``flags`` the optimizer's own flags (a tuple), ``block`` the block size, ``signed`` one bool per state
    tensor (int8 codes for state that may be negative, uint8 for non-negative state), and each state as its
    codes (1-D, a multiple of ``block`` long) followed by its scales (one per block). ``p`` is a multiple of
    ``block`` long; ``g`` may be shorter (the rest of its last block reads as zero).

    ``stochastic=True``: the state is stored with stochastic rounding (:func:`encode_first_stochastic`,
    :func:`encode_second_stochastic`),
    its uniform draws the low half of ``_bf16state.random_bits`` of the element's position and the step,
    from a last argument ``salt`` = int64 ``[step, offset of p in its buffer]`` (reproducible). Round to
    nearest stalls a slow average: with ``beta = 0.99`` a step moves a moment by 1% of the gradient, often
    less than half the distance to the next level, so rounding puts it back (Lion8bit's digits loss was
    +2.9% over float32 state with round to nearest, -1.6% with this, 3 seeds)."""

    def run(hp, flags, block, signed, p, g, *state):
        # ``block`` comes as a string: compiled with dynamic shapes an int argument becomes a symbol, and the
        # (blocks, block) views then index every element through an integer division (seen: 20 ns an element
        # on the CPU against 0.5 with the block a constant); a string is a constant of the graph
        block = int(block)
        salt = None
        if stochastic:
            *state, salt = state
        pf, gf = _blocks_in(block, p, g)
        pairs = list(zip(state[0::2], state[1::2]))
        f32 = [decode_first(c.view(-1, block), s, INV_127_SQ) if sg else decode_second(c.view(-1, block), s)
               for (c, s), sg in zip(pairs, signed)]
        pflat = pf.reshape(-1)  # p itself where p is float32: the update writes it once, at its end
        flat = [f.reshape(-1) for f in f32]
        update(hp, *flags, pflat, gf.reshape(-1), *flat)
        p.copy_(pflat)
        for j, ((codes, scales), sg, f) in enumerate(zip(pairs, signed, flat)):
            fb = f.view(-1, block)
            if salt is not None:
                index = torch.arange(p.shape[0], device=p.device, dtype=torch.int64) + salt[1]
                u = (random_bits(index, salt[0] + j * (1 << 30))[0].float() * (1.0 / 65536.0)).view(-1, block)
                c, a = encode_first_stochastic(fb, u) if sg else encode_second_stochastic(fb.clamp_min(0.0), u)
            elif sg:
                c, a = encode_first(fb)
            else:
                fb = fb.clamp_min(0.0)
                c, a = encode_second(fb, _sqrt(fb))
            codes.copy_(c.view(-1))
            scales.copy_(a)

    run.exact_shapes = True  # (compile.py: its background compile keeps the sizes, which the block divides)
    run.codec = True  # (blockwise.py: called with the optimizer's own flags and scalars)
    run.eager_cost = EAGER_COST_8BIT
    return _named(run, "blockwise_8bit_sr" if stochastic else "blockwise_8bit", update)
# pragma: no mutate end
