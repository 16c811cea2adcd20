"""Lion (Chen et al. 2023): the `lion-pytorch` package's signature, defaults and state; our fused update, and
every state variant from the precision codecs — declared once here, nothing written for each variant."""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import torch

from .._catalog import register
from .._runtime.optimizer import FusedOptimizer, fused_prologue
from ..precision.bf16 import BF16State, eight_bit_form, precision_options
from ..precision.blockwise import Blockwise8bit
from ..precision.codecs import bf16_state, blockwise_8bit, kahan


class LionScalars(NamedTuple):
    lr: float
    beta1: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    decay_factor: float     # 1 - lr * weight_decay


def _lion_eager(s: LionScalars, maximize: bool, p, g, m):
    # lion-pytorch's update_fn, op for op (bit for bit with it in every dtype)
    if maximize:
        g = -g
    p.mul_(s.decay_factor)
    update = m.clone().mul_(s.beta1).add(g, alpha=s.one_minus_beta1).sgn_()
    p.add_(update, alpha=-s.lr)
    m.mul_(s.beta2).add_(g, alpha=s.one_minus_beta2)


# pragma: no mutate start (compiled by torch.compile, which cannot trace mutmut's trampolines)
def _lion_fused(hp, maximize: bool, p, g, m):
    # one pass; r(): round where the op-by-op path rounds (a no-op in float32)
    r, pf, gf = fused_prologue(hp, p, g, maximize)
    s = LionScalars(*hp.unbind())
    mf = m.to(hp.dtype)
    pf = r(pf * s.decay_factor)
    c = torch.sign(r(r(mf * s.beta1) + s.one_minus_beta1 * gf))
    p.copy_(pf - s.lr * c)
    m.copy_(r(mf * s.beta2) + s.one_minus_beta2 * gf)
# pragma: no mutate end


@register("optimizer", torch="lion_pytorch.Lion", default_candidate=False,
          configs={"Lion": (dict(lr=1e-4), 20)})
class Lion(BF16State, FusedOptimizer):
    r"""Lion, "EvoLved Sign Momentum" (Chen et al. 2023): a drop-in for ``lion_pytorch.Lion`` with a fused
    update. One state tensor (``exp_avg``), half of Adam's, and an update of fixed magnitude per element.

    .. math::
        c_t = \operatorname{sign}(\beta_1 m_{t-1} + (1-\beta_1) g_t),\quad
        \theta_t = \theta_{t-1}(1 - \gamma\lambda) - \gamma c_t,\quad
        m_t = \beta_2 m_{t-1} + (1-\beta_2) g_t

    Args: as ``lion_pytorch.Lion`` — ``params``, ``lr=1e-4``, ``betas=(0.9, 0.99)``, ``weight_decay=0.0``,
    ``use_triton=False`` (accepted and ignored: ours is fused on every device), ``decoupled_weight_decay=False``
    (True: the decay is ``weight_decay / lr`` of the constructor's ``lr``, so it follows the schedule's ratio,
    as lion-pytorch does). Keyword-only, ours: ``maximize=False``; ``fused`` as :class:`kernels.Adam`'s;
    ``state_dtype=torch.bfloat16`` (``exp_avg`` of float32 parameters in bfloat16, stochastic rounding) and
    ``kahan_sum=True`` (bfloat16/float16 parameters carried with their rounding error), as :class:`kernels.Adam`;
    for 8-bit state, :class:`Lion8bit`. Since the update's size is ``lr`` per element, Lion wants a learning
    rate 3-10x smaller than AdamW's and a weight decay 3-10x larger (the paper's advice).

    ``lr`` must be > 0 and each beta in [0, 1] (lion-pytorch's assertions, as ``ValueError``\ s that say which).
    ``state_dict()`` is lion-pytorch's: ``exp_avg`` per parameter and ``lr``, ``betas``, ``weight_decay`` per
    group (ours adds ``maximize`` only when True, ``state_dtype``/``kahan_sum`` only when set), so each loads
    the other's checkpoints.

    Example::

        >>> import torch

        >>> from optadvisor import kernels
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = kernels.Lion(model.parameters(), lr=1e-4, weight_decay=1.0)
        >>> model(torch.randn(8, 4)).pow(2).mean().backward(); opt.step(); opt.zero_grad()

    References: X. Chen, C. Liang, D. Huang, E. Real, K. Wang, Y. Liu, H. Pham, X. Dong, T. Luong, C.-J. Hsieh,
    Y. Lu, Q. V. Le, "Symbolic Discovery of Optimization Algorithms", NeurIPS 2023; lucidrains/lion-pytorch.
    """

    _step_in_state = False  # lion-pytorch keeps no step count
    _code_dtypes = {"exp_avg": torch.int8}  # a Lion8bit checkpoint loads here dequantized

    def __init__(self, params: Any, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, use_triton: bool = False, decoupled_weight_decay: bool = False, *,
                 maximize: bool = False, fused: bool | None = None, state: Literal["param", "bf16", "8bit"] = "param",
                 state_dtype: torch.dtype | None = None,
                 kahan_sum: bool = False) -> None:
        name = type(self).__name__
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not lr > 0.0:
            raise ValueError(f"{name}: Invalid learning rate: {lr} (lion-pytorch requires lr > 0)")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta <= 1.0:
                raise ValueError(f"{name}: Invalid beta parameter at index {i}: {beta} (must be in [0, 1])")
        if len(betas) != 2:
            raise ValueError(f"{name}: betas must be two numbers (got {len(betas)})")
        self._init_lr = float(lr)
        self.decoupled_wd = bool(decoupled_weight_decay)
        defaults: dict[str, Any] = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay)
        if maximize:
            defaults["maximize"] = True
        defaults.update(precision_options(name, state, state_dtype, kahan_sum))
        super().__init__(params, defaults, fused)

    Scalars = LionScalars
    _eager_update = staticmethod(_lion_eager)
    _fused_update = staticmethod(_lion_fused)
    _bf16_update = staticmethod(bf16_state(_lion_fused))
    _kahan_update = staticmethod(kahan(_lion_fused))

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_init_lr": self._init_lr, "decoupled_wd": self.decoupled_wd}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.setdefault("_init_lr", state.get("_init_lr", 1e-4))
        self.__dict__.setdefault("decoupled_wd", state.get("decoupled_wd", False))
        super().__setstate__(state)

    def _state_init(self, group: dict[str, Any]) -> dict[str, float]:
        return {"exp_avg": 0.0}

    def _flags(self, group: dict[str, Any]) -> tuple:
        return (bool(group.get("maximize", False)),)

    def _scalars(self, group: dict[str, Any], step: int) -> LionScalars:
        lr = float(group["lr"])
        beta1, beta2 = (float(b) for b in group["betas"])
        wd = float(group["weight_decay"])
        if self.decoupled_wd:
            wd /= self._init_lr
        return LionScalars(lr, beta1, 1 - beta1, beta2, 1 - beta2, 1 - lr * wd)

    def _apply(self, s: Any, hp: Any, flags: tuple, run: dict[str, torch.Tensor], bucket: Any) -> None:
        if run["param"].is_complex():  # sign of a complex number is z/|z|, not the sign of its parts: eager
            hp = None
        super()._apply(s, hp, flags, run, bucket)


@register("optimizer", torch="lion_pytorch.Lion", default_candidate=False,
          configs={"Lion8bit": (dict(lr=1e-4), 14)})
class Lion8bit(Blockwise8bit, Lion):
    r""":class:`Lion` with ``exp_avg`` stored as signed 8-bit codes with a float32 scale per block (the map of
    :class:`Adam8bit`'s first moment, stored with stochastic rounding: unbiased, reproducible — round to nearest
    stalls Lion's slow average): 1 byte per parameter plus 4 per block instead of 4.

    .. math::
        c_t = \operatorname{sign}(\beta_1 \hat m_{t-1} + (1-\beta_1) g_t),\quad
        \theta_t = \theta_{t-1}(1 - \gamma\lambda) - \gamma c_t,\quad
        m_t = \beta_2 \hat m_{t-1} + (1-\beta_2) g_t,\quad \hat m_t = \operatorname{sign}(k)(k/127)^2 a

    No update is written for it: the 8-bit codec (``kernels.precision.codecs.blockwise_8bit``) wraps
    :class:`Lion`'s. Args: as :class:`Lion`, plus keyword-only ``block_size=256`` and ``min_8bit_size=4096``
    (see :class:`Adam8bit`). Parameters must be float32, bfloat16 or float16; DTensor parameters are refused.

    Example::

        >>> opt = kernels.Lion8bit(model.parameters(), lr=1e-4, weight_decay=1.0)

    References: Chen et al. 2023 (Lion); T. Dettmers et al., "8-bit Optimizers via Block-wise Quantization",
    ICLR 2022.
    """

    # stochastic rounding: exp_avg is an average with beta2 = 0.99, which round to nearest stalls
    _q8_update = staticmethod(blockwise_8bit(_lion_fused, stochastic=True))
    _q8_stochastic = True
    # the rounding's draws depend on the step: kept in the state (lion-pytorch ignores it) so that a run
    # resumed from a checkpoint draws what the uninterrupted run would have
    _step_in_state = True
    _step_optional = True  # lion-pytorch's checkpoints have none: they load as step 1

    def __init__(self, params: Any, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, use_triton: bool = False, decoupled_weight_decay: bool = False, *,
                 maximize: bool = False, fused: bool | None = None, block_size: int = 256,
                 min_8bit_size: int = 4096,
                 state: Literal["8bit"] = "8bit") -> None:
        self._q8_setup(block_size, min_8bit_size, state)
        super().__init__(params, lr, betas, weight_decay, use_triton, decoupled_weight_decay, maximize=maximize,
                         fused=fused)


eight_bit_form(Lion, Lion8bit)
