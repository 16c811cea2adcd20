"""Gradient gathering: bring each step's gradients where the update reads them.

Each step checks whether ``p.grad`` is the bucket's view for ``p``; a gradient that is not (autograd's fresh
tensors after ``zero_grad(set_to_none=True)``, torch's default, or one the user assigned) is, if large and
contiguous, read where it lies by a call of its own (large parameters sit at the end of the buffers, so the
small ones stay one run), and otherwise copied into the gradient buffer, all of them in one call: on the
CPU the C kernel's ``gather_copy`` (one memcpy per gradient; ``_foreach_copy_`` there copies tensor by
tensor through the dispatcher, ~1.5 us each), elsewhere, or where a gradient is not a plain contiguous
tensor of the buffer's dtype, ``_foreach_copy_``. ``p.grad`` itself is left alone: pointing it at the buffer
would free autograd's tensors at step time, and glibc then hands that memory back to the OS and the next backward faults it in again
(measured: +2 ms per iteration of a 40-layer MLP, a 15% slower loop). ``zero_grad(set_to_none=False)`` is
the opt-in (:func:`adopt_grads`): it points every existing gradient at the buffer, so backward accumulates
straight into it and steps copy nothing.
"""

from __future__ import annotations

import operator
from array import array
from itertools import repeat
from typing import Any

import torch

from . import native as _native
from .layout import NOT_PLANNED, Bucket

_grad_of = operator.attrgetter("grad")
_dtype_of = operator.attrgetter("dtype")
_data_ptr = torch.Tensor.data_ptr
_is_contiguous = torch.Tensor.is_contiguous
_NATIVE_COPY_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
#: buckets of fewer parameters copy with torch's one multi-tensor call (~1.5 us a tensor: the C call saves
#: microseconds there) and never ask for the C library, so a small model never starts its build
NATIVE_COPY_MIN_PARAMS = 32


def current_grads(bucket: Bucket) -> list[torch.Tensor | None]:
    return list(map(_grad_of, bucket.params))


def gather_grads(bucket: Bucket, owner: str) -> tuple[list[bool] | None, dict[int, torch.Tensor] | None]:
    """Returns ``(present, direct)``: ``present`` is None when every parameter has a gradient, else a
    per-parameter mask of who has one; ``direct`` maps the index of each large parameter whose gradient is
    read where it lies to that gradient, flat. Every other gradient is in the buffer. ``owner``: the
    optimizer's name, for messages."""
    grads = current_grads(bucket)
    views = bucket.grad_views
    if all(map(operator.is_, grads, views)):
        return None, None
    if (bucket.n_small == len(grads) and not any(map(operator.is_, grads, views))
            and not any(map(operator.is_, grads, repeat(None)))):
        # the usual step after the default zero_grad(): every gradient small, present and a tensor of its own
        bucket.ensure_grad_buffer()
        _copy_checked(bucket, None, grads, grads, owner)
        return None, None
    direct = None
    lo, hi = bucket.param_memory
    for i in range(bucket.n_small, len(grads)):
        g = grads[i]
        # read in place only when of the buffer's dtype: a gradient kept in another dtype (``p.grad_dtype``:
        # float32 accumulation for bfloat16 weights) is cast into the buffer by the copy, as a small one is
        # (the kernels read a pointer as the parameter's dtype: float32 bytes read as bfloat16 were garbage)
        if (g is not None and g is not views[i] and g.layout is torch.strided and g.is_contiguous()
                and g.dtype == bucket.dtype and not lo <= g.data_ptr() < hi):
            if direct is None:
                direct = {}
            direct[i] = g.view(-1)
    copied = [i for i, (g, view) in enumerate(zip(grads, views))
              if g is not None and g is not view and (direct is None or i not in direct)]
    if copied:
        bucket.ensure_grad_buffer()
        _copy_checked(bucket, copied, [grads[i] for i in copied], grads, owner)
    if any(map(operator.is_, grads, repeat(None))):
        return [g is not None for g in grads], direct
    return None, direct


def _native_plan(bucket: Bucket) -> Any:
    """``(library, byte offsets, byte sizes)`` for :func:`_native_copy`, or None where it does not apply (not
    the CPU, a complex or integer buffer, fewer than ``NATIVE_COPY_MIN_PARAMS`` parameters, no C compiler,
    ``OPTADVISOR_NATIVE=0``). Made once per bucket."""
    plan = bucket.native_copy_plan
    if plan is NOT_PLANNED:
        plan = None
        if (bucket.device.type == "cpu" and bucket.dtype in _NATIVE_COPY_DTYPES
                and len(bucket.params) >= NATIVE_COPY_MIN_PARAMS):
            lib = _native.available()
            if lib is None and _native.building():
                return None  # asked again at the next step: the library is being built or loaded
            if lib is not None:
                size = bucket.flat_grad.element_size()
                plan = (lib, array("q", [o * size for o in bucket.offsets]),
                        array("q", [n * size for n in bucket.numels]))
        bucket.native_copy_plan = plan
    return plan


def _native_copy(bucket: Bucket, indices: list[int] | None, srcs: list[torch.Tensor]) -> bool:
    """Copies ``srcs`` (the gradients of parameters ``indices``; None: all) into the gradient buffer with one
    C call, if each is a contiguous dense tensor of the buffer's dtype (the CPU is the bucket's device: torch
    keeps a gradient on its parameter's, and a moved parameter has rebuilt the bucket) that does not lie in
    the buffer. Returns False, having copied nothing, otherwise."""
    plan = _native_plan(bucket)
    if plan is None:
        return False
    try:
        # a sparse gradient is not contiguous; a parameter's grad_dtype may differ from its dtype
        if not all(map(_is_contiguous, srcs)) or set(map(_dtype_of, srcs)) != {bucket.dtype}:
            return False
        ptrs = array("q", map(_data_ptr, srcs))
    except RuntimeError:  # no strides or no storage (sparse CSR, a tensor subclass): torch's copy decides
        return False
    lib, offsets, nbytes = plan
    flat = bucket.flat_grad
    idx = None if indices is None else array("q", indices)
    refused = lib.gather_copy(flat.data_ptr(), flat.numel() * flat.element_size(), ptrs.buffer_info()[0],
                              None if idx is None else idx.buffer_info()[0], offsets.buffer_info()[0],
                              nbytes.buffer_info()[0], len(srcs), _native.threads(flat.numel()))
    return refused == 0


def _copy_checked(bucket: Bucket, indices: list[int] | None, srcs: list[torch.Tensor],
                  grads: list[torch.Tensor | None], owner: str) -> None:
    """Gradients ``srcs`` of parameters ``indices`` (None: all of them) into the gradient buffer."""
    if _native_copy(bucket, indices, srcs):
        return
    views = bucket.grad_views
    dsts = views if indices is None else [views[i] for i in indices]
    try:
        torch._foreach_copy_(dsts, srcs)  # one call; layouts are checked only if it fails
    except RuntimeError:
        refuse_unsupported(bucket, grads, owner)
        raise


def refuse_unsupported(bucket: Bucket, grads: list[torch.Tensor | None], owner: str) -> None:
    for i, g in enumerate(grads):
        if g is not None and g.layout != torch.strided:  # sparse COO, CSR, ...
            raise RuntimeError(f"{owner} does not support sparse gradients (parameter "
                               f"{bucket.positions[i]} of group {bucket.group_index} has a {g.layout} "
                               "gradient); use torch.optim.SparseAdam or dense gradients")


def adopt_grads(bucket: Bucket) -> None:
    """``zero_grad(set_to_none=False)``: every existing gradient becomes the bucket's view (the tensor it
    replaces is zeroed too, for anyone still holding it); then the buffer is zeroed."""
    grads = current_grads(bucket)
    if not all(map(operator.is_, grads, bucket.grad_views)):
        bucket.ensure_grad_buffer()
        replaced = []
        for p, g, view in zip(bucket.params, grads, bucket.grad_views):
            if g is None or g is view:
                continue
            if g.grad_fn is not None:
                g.detach_()
            else:
                g.requires_grad_(False)
            if g.layout != torch.strided:
                g.zero_()  # a sparse gradient stays (zeroed, as torch would): step() refuses it
                continue
            replaced.append(g)
            p.grad = view
        if replaced:
            torch._foreach_zero_(replaced)
    if bucket.flat_grad is not None:
        bucket.flat_grad.zero_()
