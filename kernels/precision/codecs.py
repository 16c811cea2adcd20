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

from .._bf16state import bf16_state_update, kahan_update
from .._q8math import INV_127_SQ, _blocks_in, _sqrt, decode_first, decode_second, encode_first, encode_second


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


def blockwise_8bit(update: Callable[..., Any]) -> Callable[..., Any]:
    """``update`` on block-wise 8-bit state: ``(hp, flags, block, signed, p, g, *codes_and_scales)`` with
    ``flags`` the optimizer's own flags (a tuple), ``block`` the block size, ``signed`` one bool per state
    tensor (int8 codes for state that may be negative, uint8 for non-negative state), and each state as its
    codes (1-D, a multiple of ``block`` long) followed by its scales (one per block). ``p`` is a multiple of
    ``block`` long; ``g`` may be shorter (the rest of its last block reads as zero)."""

    def run(hp, flags, block, signed, p, g, *state):
        pf, gf = _blocks_in(block, p, g)
        pairs = list(zip(state[0::2], state[1::2]))
        f32 = [decode_first(c.view(-1, block), s, INV_127_SQ) if sg else decode_second(c.view(-1, block), s)
               for (c, s), sg in zip(pairs, signed)]
        pflat = pf.reshape(-1)  # p itself where p is float32: the update writes it once, at its end
        flat = [f.reshape(-1) for f in f32]
        update(hp, *flags, pflat, gf.reshape(-1), *flat)
        p.copy_(pflat)
        for (codes, scales), sg, f in zip(pairs, signed, flat):
            fb = f.view(-1, block)
            if sg:
                c, a = encode_first(fb)
            else:
                fb = fb.clamp_min(0.0)
                c, a = encode_second(fb, _sqrt(fb))
            codes.copy_(c.view(-1))
            scales.copy_(a)

    return _named(run, "blockwise_8bit", update)
# pragma: no mutate end
