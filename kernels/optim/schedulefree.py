"""Schedule-free AdamW (Defazio et al. 2024): the ``schedulefree`` package's ``AdamWScheduleFree`` — its
signature, defaults, group options (``k``, ``weight_sum``, ``lr_max``, ``train_mode``...), state (``z``,
``exp_avg_sq``) and ``train()``/``eval()`` — with our fused update, declared once here."""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import torch

from .._catalog import register
from .._runtime.dtensor import ShardedBucket
from .._runtime.optimizer import FusedOptimizer, fused_prologue
from .._runtime.validate import check_lr, run_closure
from ..precision.bf16 import BF16State, precision_options
from ..precision.codecs import bf16_state, kahan

#: the reference's message (it raises a bare Exception; ours is a RuntimeError, which ``except Exception`` catches)
EVAL_MODE_MESSAGE = ("Optimizer was not in train mode when step is called. Please insert .train() and .eval() "
                     "calls on the optimizer. See documentation for details.")


class ScheduleFreeScalars(NamedTuple):
    beta2: float
    one_minus_beta2: float
    bias_correction2: float  # 1 - beta2^(k+1)
    eps: float
    weight_decay: float
    ckp1: float              # the new iterate's weight in the average: weight / weight_sum
    y_coef: float            # lr (beta1 (1 - ckp1) - 1)
    lr: float                # the scheduled (warmed-up) learning rate


def _sf_eager(s: ScheduleFreeScalars, decay: bool, y, g, z, v):
    # AdamWScheduleFree's for-loop path, op for op (its foreach=False), except that the gradient is not
    # overwritten in place (the reference leaves p.grad divided by the denominator; ours leaves it alone).
    # Complex tensors stay complex, as in the reference (its g*g and sqrt are complex: see _apply)
    v.mul_(s.beta2).addcmul_(g, g, value=s.one_minus_beta2)
    denom = v.div(s.bias_correction2).sqrt_().add_(s.eps)
    normalized = g.div(denom)
    if decay:
        normalized.add_(y, alpha=s.weight_decay)
    y.lerp_(end=z, weight=s.ckp1)
    y.add_(normalized, alpha=s.y_coef)
    z.sub_(normalized, alpha=s.lr)


# pragma: no mutate start (compiled by torch.compile, which cannot trace mutmut's trampolines)
def _sf_fused(hp, decay: bool, y, g, z, v):
    # one pass; r(): round where the op-by-op path rounds (a no-op in float32)
    r, yf, gf = fused_prologue(hp, y, g, False)
    s = ScheduleFreeScalars(*hp.unbind())
    zf = z.to(hp.dtype)
    vf = r(r(v.to(hp.dtype) * s.beta2) + s.one_minus_beta2 * gf * gf)
    normalized = r(gf / r(r(r(vf / s.bias_correction2).sqrt()) + s.eps))
    if decay:
        normalized = r(normalized + s.weight_decay * yf)
    yf = r(torch.lerp(yf, zf, s.ckp1))
    y.copy_(yf + s.y_coef * normalized)
    z.copy_(zf - s.lr * normalized)
    v.copy_(vf)
# pragma: no mutate end


@register("optimizer", torch="schedulefree.AdamWScheduleFree", default_candidate=False,
          configs={"ScheduleFreeAdamW": (dict(lr=2.5e-3), 28)})
class ScheduleFreeAdamW(BF16State, FusedOptimizer):
    r"""Schedule-free AdamW (Defazio, Yang, Mehta, Mishchenko, Khaled, Cutkosky 2024): no learning-rate schedule
    and no stopping time to choose — the iterate averaging replaces the decay. A drop-in for
    ``schedulefree.AdamWScheduleFree`` with a fused update; the winner of AlgoPerf's self-tuning track.

    .. math::
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,\quad
        u_t = \frac{g_t}{\sqrt{v_t/(1-\beta_2^t)}+\epsilon} + \lambda y_t,\quad
        c_t = \frac{w_t}{\sum_{i\le t} w_i},\ w_t = t^r \gamma_{\max}^{p} \\
        y_{t+1} = (1-c_t) y_t + c_t z_t + \gamma_t(\beta_1(1-c_t) - 1)\, u_t,\quad z_{t+1} = z_t - \gamma_t u_t

    (``y`` is the parameter while training — the point where gradients are taken; ``x``, the average, is what
    ``eval()`` puts in the parameters.)

    **What a user must do differently:** call ``optimizer.train()`` before training (and after each
    evaluation) and ``optimizer.eval()`` before evaluating or saving a checkpoint — a step in eval mode is
    refused; no learning-rate scheduler (``warmup_steps`` is the warmup); with BatchNorm, recompute the running
    statistics at the evaluation point (``eval()``, then a few forward passes in ``model.train()`` mode
    without stepping) before evaluating, since they were gathered at ``y``.

    Args: as ``schedulefree.AdamWScheduleFree`` — ``params``, ``lr=0.0025``, ``betas=(0.9, 0.999)``,
    ``eps=1e-8``, ``weight_decay=0`` (applied at ``y``, inside the update, as the reference does),
    ``warmup_steps=0`` (linear warmup), ``r=0.0`` (polynomial weighting of the average),
    ``weight_lr_power=2.0``, ``foreach=True`` (stored in the group as the reference does; ignored); ours, keyword-only: ``fused`` as
    :class:`kernels.Adam`'s. Groups carry the reference's bookkeeping (``k``, ``train_mode``, ``weight_sum``,
    ``lr_max``, ``scheduled_lr``), so checkpoints interchange both ways. Unlike the reference, ``step()``
    leaves ``p.grad`` as it was (the reference divides it in place by the denominator).

    Precision, keyword-only: ``kahan_sum=True`` compensates bfloat16/float16 parameters' rounding (``y``;
    ``z`` stays in the parameters' dtype, as the reference keeps it, and its rounding limits the gain: 200 steps
    on a 64x64 quadratic, mean distance to float32 training 0.059 against plain bfloat16's 0.077). No
    bfloat16 or 8-bit state: ``z`` is a second copy of the weights, not a moment — bfloat16 ``z`` of float32
    weights (stochastically rounded) moved them by up to 0.10 from float32 training in that test, and 8-bit
    codes would round it away (both refused by name).

    Example::

        >>> import torch

        >>> from optadvisor import kernels
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = kernels.ScheduleFreeAdamW(model.parameters(), lr=2.5e-3, warmup_steps=100)
        >>> opt.train()
        >>> model(torch.randn(8, 4)).pow(2).mean().backward(); opt.step(); opt.zero_grad()
        >>> opt.eval()  # the parameters are now the average, for evaluation and checkpoints

    References: A. Defazio, X. Yang, H. Mehta, K. Mishchenko, A. Khaled, A. Cutkosky, "The Road Less
    Scheduled", NeurIPS 2024; facebookresearch/schedule_free.
    """

    _step_in_state = False  # the count is the group's "k"

    def __init__(self, params: Any, lr: float | torch.Tensor = 0.0025, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0, warmup_steps: int = 0, r: float = 0.0,
                 weight_lr_power: float = 2.0, foreach: bool | None = True, *, fused: bool | None = None,
                 state: Literal["param"] = "param", state_dtype: torch.dtype | None = None,
                 kahan_sum: bool = False) -> None:
        check_lr(lr)
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
        if len(betas) != 2:
            raise ValueError(f"ScheduleFreeAdamW: betas must be two numbers (got {len(betas)})")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"ScheduleFreeAdamW: warmup_steps must be an int >= 0 (got {warmup_steps!r})")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, r=r, k=0, warmup_steps=warmup_steps, train_mode=False,
                        weight_sum=0.0, lr_max=-1.0, scheduled_lr=0.0, weight_lr_power=weight_lr_power,
                        weight_decay=weight_decay, foreach=foreach)
        if state == "bf16" or state_dtype is torch.bfloat16:
            raise ValueError("ScheduleFreeAdamW: bfloat16 state is not available: z is a second copy of the "
                             "weights, not a moment, and rounding it to bfloat16 (even stochastically) moved "
                             "float32 weights by up to 0.10 in 200 steps of a 64x64 quadratic; use "
                             "kahan_sum=True with bfloat16 weights, or float32 state")
        defaults.update(precision_options(type(self).__name__, state, state_dtype, kahan_sum))
        self._now: dict[int, ScheduleFreeScalars] = {}
        super().__init__(params, defaults, fused)

    Scalars = ScheduleFreeScalars
    _eager_update = staticmethod(_sf_eager)
    _fused_update = staticmethod(_sf_fused)
    _bf16_update = staticmethod(bf16_state(_sf_fused))
    _kahan_update = staticmethod(kahan(_sf_fused))

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.setdefault("_now", {})
        super().__setstate__(state)

    def _apply(self, s: Any, hp: Any, flags: tuple, run: dict[str, torch.Tensor], bucket: Any) -> None:
        if run["param"].is_complex():  # the reference's complex math (g*g, sqrt of a complex): eager
            hp = None
        super()._apply(s, hp, flags, run, bucket)

    def _state_init(self, group: dict[str, Any]) -> dict[str, float]:
        return {"z": 0.0, "exp_avg_sq": 0.0}  # z starts as the parameter: copied at its first step

    def _flags(self, group: dict[str, Any]) -> tuple:
        return (float(group["weight_decay"]) != 0,)

    def _scalars(self, group: dict[str, Any], step: int) -> ScheduleFreeScalars:
        return self._now[id(group)]

    # ---- the group's bookkeeping, once per step (the reference's, line for line) -----------------------------
    def _advance(self, group: dict[str, Any]) -> ScheduleFreeScalars:
        beta1, beta2 = group["betas"]
        k, warmup = group["k"], group["warmup_steps"]
        sched = (k + 1) / warmup if k < warmup else 1.0
        lr = group["lr"] * sched
        group["scheduled_lr"] = lr
        lr_max = group["lr_max"] = max(lr, group["lr_max"])
        weight = ((k + 1) ** group["r"]) * (lr_max ** group["weight_lr_power"])
        weight_sum = group["weight_sum"] = group["weight_sum"] + weight
        try:
            ckp1 = weight / weight_sum
        except ZeroDivisionError:
            ckp1 = 0
        group["k"] = k + 1
        lr, ckp1 = float(lr), float(ckp1)
        return ScheduleFreeScalars(float(beta2), 1 - float(beta2), 1 - beta2 ** (k + 1), float(group["eps"]),
                                   float(group["weight_decay"]), ckp1, lr * (beta1 * (1 - ckp1) - 1), lr)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One step at ``y`` (train mode; in eval mode a RuntimeError, as the reference refuses it)."""
        if not self.param_groups[0]["train_mode"]:
            raise RuntimeError(EVAL_MODE_MESSAGE)
        loss = run_closure(closure)
        self._now = {id(g): self._advance(g) for g in self.param_groups}
        super().step()
        return loss

    def _step_bucket(self, bucket: Any) -> None:
        # z starts as a copy of the parameter at its first step (the reference's torch.clone(p))
        if bucket.common_step != 0 and (bucket.common_step is not None or 0 not in bucket.host_steps):
            super()._step_bucket(bucket)
            return
        init = self._bucket_init(bucket, self.param_groups[bucket.group_index])
        bucket.ensure_state(init)
        steps = [0] * len(bucket.params) if bucket.common_step == 0 else bucket.host_steps
        for i, n in enumerate(steps):
            if n == 0:
                if isinstance(bucket, ShardedBucket):
                    bucket.local_state("z", i).copy_(bucket.local_flat[i])
                else:
                    bucket.state_view("z", init["z"], i).copy_(bucket.params[i].detach())
        super()._step_bucket(bucket)

    # ---- the evaluation point ---------------------------------------------------------------------------------
    def _swap(self, to_train: bool) -> None:
        if self._layout_changed():
            self._rebuild()
        for group in self.param_groups:
            if bool(group["train_mode"]) == to_train:
                continue
            beta1 = group["betas"][0]
            weight = 1 - beta1 if to_train else 1 - 1 / beta1
            for p in group["params"]:
                # (self.state is a defaultdict: as the reference's, this makes an empty entry for a parameter
                # without state, which its state_dict() then lists: checkpoints have the same layout)
                z = self.state[p].get("z")
                if z is None:
                    continue
                comp = self.state[p].get("kahan_comp")
                if comp is None:  # z may be bfloat16 state of a float32 parameter: read in the parameter's dtype
                    p.lerp_(end=z.to(p.device, p.dtype), weight=weight)
                else:  # a compensated bfloat16/float16 parameter: moved in float32 with what rounding lost
                    full = p.float() + comp.float()
                    full.lerp_(z.float(), weight)
                    p.copy_(full)
                    comp.copy_(full - p.float())
            group["train_mode"] = to_train
        for bucket in self._buckets:  # the moves above are ours: the compensation stays (see BF16State)
            if getattr(bucket, "kahan_versions", None) is not None:
                bucket.kahan_versions = [p._version for p in bucket.params]

    @torch.no_grad()
    def eval(self) -> None:
        """Put the average ``x`` in the parameters (for evaluation and checkpoints)."""
        self._swap(False)

    @torch.no_grad()
    def train(self) -> None:
        """Put the gradient point ``y`` in the parameters (before training steps)."""
        self._swap(True)
