"""Linear cross-entropy: cross-entropy of ``hidden @ weight.T + bias`` without materializing the logits
(the cross-entropy family; computed in chunks of rows), the function and its ``nn.Module`` class."""

from __future__ import annotations

import torch
from torch import Tensor

from .._catalog import register
from .base import (
    _check_float,
    _check_reduction,
    _check_smoothing,
    _check_targets,
    _compute_dtype,
    _entry,
    _run,
)
from .cross_entropy import _ce_index_core

CHUNK_LOGITS = 1 << 23  # the default chunk holds about this many logits (32 MiB in float32)


def default_chunk_rows(n_vocab: int) -> int:
    """Rows per chunk when ``chunk_size`` is not given: about :data:`CHUNK_LOGITS` logits, at least one row."""
    return max(1, CHUNK_LOGITS // max(n_vocab, 1))


def _check_options(name: str, label_smoothing, chunk_size) -> None:
    _check_smoothing(name, label_smoothing, allow_bool=False)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{name}: 'chunk_size' must be a positive int (got {chunk_size!r})")


def linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None,
                         ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                         chunk_size: int | None = None) -> Tensor:
    r"""``cross_entropy(hidden @ weight.T + bias, target)`` without ever materializing the (N, V) logits.

    Rows are processed in chunks of ``chunk_size`` (default: about 8M logits per chunk); each chunk's
    logits give its loss and, in the same pass, the gradients for ``hidden``, ``weight`` and ``bias``.
    ``hidden``: (N, D) or (..., D); ``weight``: (V, D); ``target``: class indices of shape hidden.shape[:-1].

    Example::

        >>> loss = kernels.linear_cross_entropy(h, lm_head.weight, tokens, chunk_size=1024)
    """
    name = "linear_cross_entropy"
    _entry(name)  # autocast: the matmul runs as autocast has it; the loss is returned in float32
    _check_reduction(name, reduction)
    _check_float(name, "hidden", hidden)
    _check_float(name, "weight", weight)
    if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{name}: need hidden (..., D) and weight (V, D) with the same D "
                         f"(got {tuple(hidden.shape)} and {tuple(weight.shape)})")
    if bias is not None:
        _check_float(name, "bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{name}: bias must have shape ({weight.shape[0]},) (got {tuple(bias.shape)})")
    _check_options(name, label_smoothing, chunk_size)
    n_vocab, dim = weight.shape
    h2 = hidden.reshape(-1, dim)
    t = _check_targets(name, target, tuple(hidden.shape[:-1]), n_vocab, ignore_index).reshape(-1)
    rows = h2.shape[0]
    chunk = chunk_size or default_chunk_rows(n_vocab)
    smoothing = float(label_smoothing)

    def passes(row_scale: Tensor | None, need_grad: bool):
        """One sweep over row chunks. row_scale: per-row multiplier of the gradient (None = 1)."""
        cd = _compute_dtype(hidden.dtype)
        h, wt = h2.detach(), weight.detach()
        b = bias.detach() if bias is not None else None
        losses, wts = [], []
        gh = torch.empty_like(h) if need_grad and hidden.requires_grad else None
        gw = torch.zeros(weight.shape, dtype=cd, device=weight.device) if need_grad and weight.requires_grad \
            else None
        gb = torch.zeros(n_vocab, dtype=cd, device=weight.device) if need_grad and bias is not None and \
            bias.requires_grad else None
        for lo in range(0, rows, chunk):
            hi = min(rows, lo + chunk)
            logits = h[lo:hi] @ wt.T if b is None else torch.addmm(b, h[lo:hi], wt.T)
            loss, w_t, g = _ce_index_core(logits.to(cd), t[lo:hi], 1, None, ignore_index, smoothing, need_grad)
            losses.append(loss)
            wts.append(w_t)
            if not need_grad:
                continue
            if row_scale is not None:
                g.mul_(row_scale[lo:hi].unsqueeze(1))
            gl = g.to(hidden.dtype)
            if gh is not None:
                torch.mm(gl, wt, out=gh[lo:hi])
            if gw is not None:
                gw.addmm_(g.T, h[lo:hi].to(cd))
            if gb is not None:
                gb.add_(g.sum(0))
        cat = torch.cat(losses) if losses else torch.zeros(0, dtype=cd, device=h.device)
        wsum = torch.cat(wts).sum() if wts else torch.zeros((), dtype=cd, device=h.device)
        grads = [None if gh is None else gh.reshape(hidden.shape), None if gw is None else gw.to(weight.dtype),
                 None, None if gb is None else gb.to(bias.dtype)]
        return cat, wsum, grads

    # under autocast the loss is float32, as torch's cross_entropy returns it there
    out_dtype = torch.float32 if torch.is_autocast_enabled(hidden.device.type) else hidden.dtype

    def compute(need_grad=True):
        cd = _compute_dtype(hidden.dtype)
        # the mean's denominator (non-ignored rows) is known before any logits are computed
        denom = float((t != ignore_index).sum()) if reduction == "mean" else 1.0
        inv = 1.0 / denom if denom else 0.0
        # float16: the gradients are computed in backward, scaled by the upstream gradient (a GradScaler's
        # scale) before they are rounded to float16, where unscaled they would flush to zero
        lazy = reduction == "none" or hidden.dtype == torch.float16
        if lazy or not need_grad:
            loss, wsum, _ = passes(None, False)
            out = loss.reshape(target.shape) if reduction == "none" else loss.sum() / wsum if reduction == "mean" \
                else loss.sum()
            out = out.to(out_dtype)
            if not need_grad:
                return out, None, None

            def recompute(go):
                scale = go.reshape(-1).to(cd) if reduction == "none" else (go.to(cd) * inv).expand(rows)
                return passes(scale, True)[2]
            return out, recompute, None
        scale = None if inv == 1.0 else torch.full((rows,), inv, dtype=cd, device=h2.device)
        loss, wsum, grads = passes(scale, need_grad)
        out = (loss.sum() / wsum if reduction == "mean" else loss.sum()).to(out_dtype)
        return out, grads, None

    return _run(name, compute, hidden, weight, target, bias)


@register("loss", torch=None, functional=linear_cross_entropy)
class LinearCrossEntropyLoss(torch.nn.Module):
    """Holds :func:`linear_cross_entropy`'s options; called as ``loss_fn(hidden, weight, target, bias=None)``.

    Example::

        >>> loss = kernels.LinearCrossEntropyLoss(chunk_size=4)(h, lm_head.weight, tokens); loss.backward()
    """

    def __init__(self, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                 chunk_size: int | None = None) -> None:
        super().__init__()
        _check_reduction("LinearCrossEntropyLoss", reduction)
        _check_options("LinearCrossEntropyLoss", label_smoothing, chunk_size)
        self.ignore_index, self.reduction = ignore_index, reduction
        self.label_smoothing, self.chunk_size = label_smoothing, chunk_size

    def forward(self, hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None) -> Tensor:
        return linear_cross_entropy(hidden, weight, target, bias, ignore_index=self.ignore_index,
                                    reduction=self.reduction, label_smoothing=self.label_smoothing,
                                    chunk_size=self.chunk_size)
