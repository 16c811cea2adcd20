"""Kahan-compensated bfloat16/float16 parameters (``kahan_sum=True``): the compensation buffer's update around
any optimizer's float32 update (:func:`kahan_update`, wrapped for an optimizer by ``codecs.kahan``), and which
parameters get one (:func:`kahan_kind`). The bucket handling (and the reset after an edit of the weights)
is the precision mixin's, ``bf16.BF16State``."""

from __future__ import annotations

from typing import Any

import torch

from .._runtime.dtensor import is_dtensor

KAHAN = "kahan"
LOW_PRECISION = (torch.bfloat16, torch.float16)


def check_kahan_sum(owner: str, kahan_sum: Any) -> None:
    if not isinstance(kahan_sum, bool):
        raise ValueError(f"{owner}: kahan_sum must be True or False (got {kahan_sum!r})")


def kahan_kind(owner: str, p: torch.Tensor, group: dict[str, Any], where: str) -> str | None:
    """The bucket kind of a parameter whose group asks for Kahan-compensated updates (None: not one)."""
    if not group.get("kahan_sum") or p.dtype not in LOW_PRECISION:
        return None  # float32/float64 parameters: nothing is lost to rounding worth compensating
    if is_dtensor(p):
        raise ValueError(f"{owner}: {where} is a DTensor; kahan_sum=True serves bfloat16 and float16 "
                         "parameters that are not DTensors")
    return KAHAN


# pragma: no mutate start (compiled by torch.compile, which cannot trace mutmut's trampolines)
def half_ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Half the spacing of ``dtype`` (bfloat16 or float16) at float32 values ``x`` that are ``dtype``'s: the
    exponent's power of two (read from float32's bits) over the mantissa's width, at least the smallest
    subnormal (zero, subnormals)."""
    mbits, tiny = (7, 2.0 ** -133) if dtype == torch.bfloat16 else (10, 2.0 ** -24)
    top = (x.abs().view(torch.int32) & 0x7F800000).view(torch.float32)
    return torch.clamp_min(top * 2.0 ** -mbits, tiny) * 0.5


def kahan_update(update: Any, hp: Any, flags: tuple, p, g, states: tuple, comp) -> None:
    """Any optimizer's update (``update(hp, *flags, p, g, *states)``, its compiled or eager one) of a
    bfloat16/float16 parameter ``p`` with Kahan compensation ``comp`` (same dtype): the float32 update runs
    on the sum ``p + comp`` and float32 copies of the gradient and state; ``p`` stores the new parameter
    rounded to nearest, ``comp`` what that rounding lost, and the state is rounded to nearest. ``p + comp`` thus
    carries about twice ``p``'s significant bits, so updates smaller than half an ulp of ``p`` accumulate
    instead of vanishing (Kahan 1965; Zamirai et al. 2020 for bfloat16 training)."""
    p32, c32 = p.float(), comp.float()
    # a compensation larger than half an ulp of ``p`` is not what rounding ``p`` left: ``p`` was edited since
    # the last step (weight clipping, a projection, ``p.data`` assigned into); its stale residue is dropped.
    # In normal steps it never is: the residue of rounding to nearest is at most half an ulp.
    pf = p32 + torch.where(c32.abs() <= half_ulp(p32, p.dtype), c32, 0.0)
    f32 = [t.float() for t in states]
    update(hp, *flags, pf, g.float(), *f32)
    p.copy_(pf)
    comp.copy_(pf - p.float())
    for t, f in zip(states, f32):
        t.copy_(f)
# pragma: no mutate end
