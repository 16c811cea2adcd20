"""Muon (Jordan et al. 2024): torch.optim.Muon's signature, defaults, messages and state; the momentum and
weight decay of every matrix in one fused pass, the Newton-Schulz orthogonalization written here."""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import torch

from .._catalog import register
from .._runtime.dtensor import is_dtensor
from .._runtime.optimizer import FusedOptimizer, fused_prologue

#: torch's defaults (torch.optim._muon): Keller Jordan's quintic coefficients, five iterations
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
EPS = 1e-7
ADJUST_LR_FNS = ("original", "match_rms_adamw")


def newton_schulz(update: torch.Tensor, coefficients: tuple[float, float, float], steps: int,
                  eps: float) -> torch.Tensor:
    """The orthogonalized ``update`` (a 2-D matrix): ``steps`` quintic Newton-Schulz iterations in bfloat16 on
    the matrix normalized by its Frobenius norm, its short side first (``X <- aX + (bA + cA^2)X``, ``A =
    XX^T``): ``U S' V^T`` with ``S'`` near 1, not exactly ``UV^T`` (Jordan et al.: it does not hurt). A
    bfloat16 ``update`` is normalized in place (ours is Muon's own scratch buffer)."""
    if steps >= 100:
        raise ValueError("Number of steps must be less than 100 for computational efficiency")
    if update.ndim != 2:
        raise ValueError("Input tensor gradient must be a 2D matrix")
    if len(coefficients) != 3:
        raise ValueError("Coefficients must be a tuple of exactly 3 values")
    a, b, c = coefficients
    x = update.bfloat16()
    tall = update.size(0) > update.size(1)
    if tall:
        x = x.T
    x.div_(x.norm().clamp(min=eps))
    for _ in range(steps):
        gram = x @ x.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, poly, x, beta=a)
    return x.T if tall else x


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """The learning rate for a matrix of ``shape``: ``"original"`` (default) ``lr * sqrt(max(1, rows/cols))``
    (Jordan), ``"match_rms_adamw"`` ``0.2 lr sqrt(max(rows, cols))`` (Liu et al.: AdamW's lr and decay carry
    over)."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * (0.2 * math.sqrt(max(rows, cols)))
    return lr


class MuonScalars(NamedTuple):
    one_minus_momentum: float
    momentum: float
    decay_factor: float  # 1 - lr * weight_decay


def _muon_eager(s: MuonScalars, nesterov: bool, p, g, buf, u):
    # torch's for-loop path op for op, but the decay of p (which the orthogonalized update does not read) done
    # here, before the matrices are orthogonalized, rather than after: the same numbers
    buf.lerp_(g, s.one_minus_momentum)
    u.copy_(g.lerp(buf, s.momentum) if nesterov else buf)
    p.mul_(s.decay_factor)


# pragma: no mutate start (compiled by torch.compile, which cannot trace mutmut's trampolines)
def _muon_fused(hp, nesterov: bool, p, g, buf, u):
    # one pass over every matrix of the run: momentum, the update to orthogonalize (bfloat16, what the
    # iteration reads), the decay
    _, pf, gf = fused_prologue(hp, p, g, False)
    s = MuonScalars(*hp.unbind())
    bf = torch.lerp(buf.to(hp.dtype), gf, s.one_minus_momentum)
    u.copy_(torch.lerp(gf, bf, s.momentum) if nesterov else bf)
    buf.copy_(bf)
    p.copy_(pf * s.decay_factor)
# pragma: no mutate end


@register("optimizer", torch="torch.optim.Muon", default_candidate=False,
          configs={"Muon": (dict(lr=1e-3), 22)})
class Muon(FusedOptimizer):
    r"""Muon, "MomentUm Orthogonalized by Newton-schulz" (Jordan et al. 2024): a drop-in for
    :class:`torch.optim.Muon`. For the 2-D weights of hidden layers only — embeddings, the output head,
    biases and norms belong to AdamW (:func:`kernels.muon_with_adamw` splits a model that way).

    .. math::
        B_t = \mu B_{t-1} + (1-\mu) g_t,\quad \tilde B_t = g_t + \mu(B_t - g_t)\ (\text{nesterov, else } B_t),\\
        \theta_t = \theta_{t-1}(1-\gamma\lambda) - \gamma' \operatorname{NS}_k^{(a,b,c)}(\tilde B_t)

    (``B`` is an exponential average, as torch's ``lerp``: torch's docs write ``μB + g``.) Args: as
    torch.optim.Muon — ``params`` (2-D only: torch's ``ValueError`` otherwise), ``lr=1e-3``,
    ``weight_decay=0.1``, ``momentum=0.95``, ``nesterov=True``, ``ns_coefficients=(3.4445, -4.7750, 2.0315)``,
    ``eps=1e-7``, ``ns_steps=5``, ``adjust_lr_fn=None`` (``"original"``: ``γ' = γ sqrt(max(1, rows/cols))``;
    ``"match_rms_adamw"``: ``γ' = 0.2 γ sqrt(max(rows, cols))``, for AdamW's learning rate and decay).
    Ours, keyword-only: ``fused`` as :class:`kernels.Adam`'s (the momentum, the update's bfloat16 copy and the
    decay of every matrix in one compiled pass; the Newton-Schulz matrix products are torch's ``addmm``
    either way). State: ``momentum_buffer``, torch's; checkpoints interchange both ways.

    Not available: low-precision state variants (the momentum buffer is what the orthogonalization reads),
    complex parameters (torch refuses them) and DTensor/FSDP2 parameters — Newton-Schulz needs the whole
    matrix, and a shard's orthogonalization is not the matrix's: refused by name rather than computed on
    shards (gather the matrix, or use AdamW for sharded parameters).

    Example::

        >>> import torch

        >>> from optadvisor import kernels
        >>> layer = torch.nn.Linear(16, 16, bias=False)
        >>> opt = kernels.Muon(layer.parameters(), lr=0.02)
        >>> layer(torch.randn(8, 16)).pow(2).mean().backward(); opt.step(); opt.zero_grad()

    References: K. Jordan, Y. Jin, V. Boza, J. You, F. Cesista, L. Newhouse, J. Bernstein, "Muon: An optimizer
    for hidden layers in neural networks", 2024; J. Liu et al., "Muon is Scalable for LLM Training", 2025.
    """

    _step_in_state = False  # torch keeps none
    direct_grad_min_numel = 1 << 62  # every gradient goes through the flat buffer: the pass reads one buffer

    def __init__(self, params: Any, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                 eps: float = EPS, ns_steps: int = NS_STEPS,
                 adjust_lr_fn: Literal["original", "match_rms_adamw"] | None = None, *,
                 fused: bool | None = None) -> None:
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Learning rate should be >= 0 but is: {lr}")
        if not 0.0 <= momentum:
            raise ValueError(f"momentum should be >= 0 but is: {momentum}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"weight decay should be >= 0 but is: {weight_decay}")
        if adjust_lr_fn is not None and adjust_lr_fn not in ADJUST_LR_FNS:
            raise ValueError(f"Adjust learning rate function {adjust_lr_fn} is not supported")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn)
        super().__init__(params, defaults, fused)

    Scalars = MuonScalars
    _eager_update = staticmethod(_muon_eager)
    _fused_update = staticmethod(_muon_fused)

    def _bucket_kind(self, p: torch.Tensor, group: dict[str, Any], where: str) -> Any:
        if p.ndim != 2:
            raise ValueError(f"Muon only supports 2D parameters whereas we found a parameter with size: {p.size()}")
        if p.is_complex():
            raise ValueError(f"{type(self).__name__}: {where} is complex; Muon does not support complex parameters")
        if is_dtensor(p):
            raise ValueError(f"{type(self).__name__}: {where} is a DTensor; Newton-Schulz orthogonalizes a whole "
                             "matrix, not a shard: gather the matrix or optimize sharded parameters with AdamW")
        return None

    def _state_init(self, group: dict[str, Any]) -> dict[str, float]:
        return {"momentum_buffer": 0.0}

    def _flags(self, group: dict[str, Any]) -> tuple:
        return (bool(group["nesterov"]),)

    def _scalars(self, group: dict[str, Any], step: int) -> MuonScalars:
        momentum = float(group["momentum"])
        return MuonScalars(1 - momentum, momentum, 1 - float(group["lr"]) * float(group["weight_decay"]))

    def _apply(self, s: Any, hp: Any, flags: tuple, run: dict[str, torch.Tensor], bucket: Any) -> None:
        p, g, buf = run["param"], run["grad"], run["momentum_buffer"]
        scratch = getattr(bucket, "muon_update", None)
        if scratch is None or scratch.numel() != bucket.total:
            # bfloat16: what the iteration reads (torch's .bfloat16() of the float32 update: the same rounding)
            scratch = bucket.muon_update = torch.empty(bucket.total, dtype=torch.bfloat16, device=p.device)
        origin = p.storage_offset() - bucket.flat_param.storage_offset()
        u = scratch[origin:origin + p.numel()]
        super()._apply(s, hp, flags, {"param": p, "grad": g, "momentum_buffer": buf, "update": u}, bucket)
        group = self.param_groups[bucket.group_index]
        coefficients, steps, eps = group["ns_coefficients"], group["ns_steps"], group["eps"]
        lr = float(group["lr"])
        for i, (o, n) in enumerate(zip(bucket.offsets, bucket.numels)):
            if origin <= o < origin + p.numel():
                shape = bucket.params[i].shape
                ortho = newton_schulz(u[o - origin:o - origin + n].view(shape), coefficients, steps, eps)
                p[o - origin:o - origin + n].view(shape).add_(ortho, alpha=-adjusted_lr(lr, group["adjust_lr_fn"],
                                                                                          shape))
