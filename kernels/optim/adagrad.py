"""Adagrad: torch.optim.Adagrad's signature, defaults, validation and state layout; our fused update."""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import torch

from .._catalog import register
from .._runtime.optimizer import FusedOptimizer, as_real, fused_prologue
from .._runtime.validate import check_lr, check_selectors
from ..precision.bf16 import BF16State, eight_bit_form, precision_options
from ..precision.blockwise import Blockwise8bit
from ..precision.codecs import bf16_state, blockwise_8bit, kahan


class AdagradScalars(NamedTuple):
    clr: float              # lr / (1 + (t - 1) * lr_decay)
    weight_decay: float
    eps: float


def _adagrad_eager(s: AdagradScalars, maximize: bool, decay: bool, p, g, state_sum):
    # torch.optim.Adagrad's for-loop path (dense gradients), op for op
    if maximize:
        g = -g
    if decay:
        g = g.add(p, alpha=s.weight_decay)
    if p.is_complex():
        p, g, state_sum = as_real(p, g, state_sum)
    state_sum.addcmul_(g, g, value=1)
    std = state_sum.sqrt().add_(s.eps)
    p.addcdiv_(g, std, value=-s.clr)


# pragma: no mutate start (compiled by torch.compile, which cannot trace mutmut's trampolines)
def _adagrad_fused(hp, maximize: bool, decay: bool, p, g, state_sum):
    # One pass: param, grad and sum read once, param and sum written once. r(): round where torch rounds.
    r, pf, gf = fused_prologue(hp, p, g, maximize)
    s = AdagradScalars(*hp.unbind())
    if decay:
        gf = r(gf + s.weight_decay * pf)
    sq = r(state_sum.to(hp.dtype) + gf * gf)
    state_sum.copy_(sq)
    std = r(r(sq.sqrt()) + s.eps)
    p.copy_(pf - s.clr * gf / std)
# pragma: no mutate end


@register("optimizer", torch="torch.optim.Adagrad", default_candidate=False,
          configs={"Adagrad": (dict(lr=1e-2), 20)})
class Adagrad(BF16State, FusedOptimizer):
    r"""Adagrad (Duchi, Hazan & Singer, 2011); a drop-in for :class:`torch.optim.Adagrad` (dense gradients).

    .. math::
        \begin{aligned}
        &\textbf{input}: \gamma \text{ (lr)}, \theta_0, f(\theta), \lambda \text{ (weight decay)},
            \tau \text{ (initial accumulator value)}, \eta \text{ (lr decay)}, \epsilon \\
        &\textbf{initialize}: state\_sum_0 \leftarrow \tau \\
        &\textbf{for}\ t = 1, 2, \ldots: \\
        &\quad g_t \leftarrow \pm\nabla_\theta f_t(\theta_{t-1}) + \lambda\theta_{t-1} \\
        &\quad \tilde\gamma \leftarrow \gamma / (1 + (t - 1)\eta) \\
        &\quad state\_sum_t \leftarrow state\_sum_{t-1} + g_t^2 \\
        &\quad \theta_t \leftarrow \theta_{t-1} - \tilde\gamma\, g_t / (\sqrt{state\_sum_t} + \epsilon)
        \end{aligned}

    Args: as torch.optim.Adagrad — ``params``, ``lr=1e-2``, ``lr_decay=0``, ``weight_decay=0``,
    ``initial_accumulator_value=0``, ``eps=1e-10``, ``foreach`` (accepted and ignored), keyword-only
    ``maximize=False``. ``fused`` selects *our* compiled update (see :class:`kernels.Adam`);
    ``differentiable=True`` is refused. As in torch, the state (``step`` 0 and ``sum`` filled with
    ``initial_accumulator_value``) exists from construction, so ``state_dict()`` has it before any step;
    unlike torch, a group added later gets it too, and each group's own ``initial_accumulator_value`` fills
    its ``sum`` (torch fills every group's with the constructor's value). Sparse gradients are refused
    (torch.optim.Adagrad takes them).

    Example::

        >>> import torch

        >>> from optadvisor import kernels
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = kernels.Adagrad(model.parameters(), lr=0.1, initial_accumulator_value=0.1)
        >>> model(torch.randn(8, 4)).pow(2).mean().backward(); opt.step(); opt.zero_grad()

    References: J. Duchi, E. Hazan, Y. Singer, "Adaptive Subgradient Methods for Online Learning and
    Stochastic Optimization", JMLR 12 (2011).

    ``state_dtype=torch.bfloat16`` (keyword-only, ours) keeps a float32 parameter's ``sum`` in bfloat16, stored
    with stochastic rounding; ``kahan_sum=True`` (ours) compensates the rounding of bfloat16/float16
    parameters (see :class:`kernels.Adam` for both). Neither is written here: the precision codecs derive them
    from the one update below. For 8-bit state, :class:`Adagrad8bit`.
    """

    Scalars = AdagradScalars
    # an 8-bit optimizer's checkpoint (kernels.Adagrad8bit) loads here dequantized
    _code_dtypes = {"sum": torch.uint8}
    _bf16_update = staticmethod(bf16_state(_adagrad_fused))
    _kahan_update = staticmethod(kahan(_adagrad_fused))
    _legacy_group_defaults = dict(foreach=None, maximize=False, differentiable=False, fused=None)
    _eager_update = staticmethod(_adagrad_eager)
    _fused_update = staticmethod(_adagrad_fused)
    _state_at_construction = True

    def __init__(self, params: Any, lr: float | torch.Tensor = 1e-2, lr_decay: float = 0,
                 weight_decay: float = 0, initial_accumulator_value: float = 0, eps: float = 1e-10,
                 foreach: bool | None = None, *, maximize: bool = False, differentiable: bool = False,
                 fused: bool | None = None, state: Literal["param", "bf16", "8bit"] = "param",
                 state_dtype: torch.dtype | None = None,
                 kahan_sum: bool = False) -> None:
        check_lr(lr)
        if not 0.0 <= lr_decay:
            raise ValueError(f"Invalid lr_decay value: {lr_decay}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not 0.0 <= initial_accumulator_value:
            raise ValueError(f"Invalid initial_accumulator_value value: {initial_accumulator_value}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        check_selectors(type(self).__name__, differentiable=differentiable)
        defaults = dict(lr=lr, lr_decay=lr_decay, eps=eps, weight_decay=weight_decay,
                        initial_accumulator_value=initial_accumulator_value, foreach=foreach, maximize=maximize,
                        differentiable=False, fused=None)
        defaults.update(precision_options(type(self).__name__, state, state_dtype, kahan_sum))
        super().__init__(params, defaults, fused)

    def share_memory(self) -> None:
        """torch.optim.Adagrad's Hogwild helper is not supported: the state lives in flat buffers that the
        parameters alias, and moving them to shared memory would detach the parameters from them."""
        raise NotImplementedError("kernels.Adagrad.share_memory(): state in shared memory (Hogwild training) is "
                                  "not supported; use torch.optim.Adagrad for that")

    def _state_init(self, group: dict[str, Any]) -> dict[str, float]:
        return {"sum": float(group["initial_accumulator_value"])}

    def _flags(self, group: dict[str, Any]) -> tuple:
        return bool(group["maximize"]), float(group["weight_decay"]) != 0

    def _scalars(self, group: dict[str, Any], step: int) -> AdagradScalars:
        lr = float(group["lr"])
        return AdagradScalars(lr / (1 + (step - 1) * float(group["lr_decay"])), float(group["weight_decay"]),
                              float(group["eps"]))


@register("optimizer", torch="torch.optim.Adagrad", default_candidate=False,
          configs={"Adagrad8bit": (dict(lr=1e-2), 14)})
class Adagrad8bit(Blockwise8bit, Adagrad):
    r""":class:`Adagrad` with ``sum`` stored as unsigned 8-bit codes with a float32 scale per block (the map of
    :class:`Adam8bit`'s second moment, whose levels exclude zero), stored with stochastic rounding: 1 byte per
    parameter plus 4 per block instead of 4.

    .. math::
        s_t = \hat s_{t-1} + g_t^2,\quad \theta_t = \theta_{t-1} - \tilde\gamma\, g_t / (\sqrt{s_t} + \epsilon),
        \quad \hat s_t = \big((d+1)/256\big)^2 a

    No update is written for it: the 8-bit codec (``kernels.precision.codecs.blockwise_8bit``) wraps
    :class:`Adagrad`'s. Stochastic rounding, because ``sum`` only grows and late gradients add less than half
    a level to it: rounded to nearest it would stop growing and the step size stop shrinking.
    ``initial_accumulator_value`` is represented exactly (every code at the top of the map, the scale that
    value). Args: as :class:`torch.optim.Adagrad`, plus keyword-only ``block_size=256`` and
    ``min_8bit_size=4096`` (see :class:`Adam8bit`).

    Example::

        >>> opt = kernels.Adagrad8bit(model.parameters(), lr=0.1)

    References: Duchi et al. 2011 (Adagrad); T. Dettmers et al., "8-bit Optimizers via Block-wise
    Quantization", ICLR 2022.
    """

    _q8_update = staticmethod(blockwise_8bit(_adagrad_fused, stochastic=True))
    _q8_stochastic = True

    def __init__(self, params: Any, lr: float | torch.Tensor = 1e-2, lr_decay: float = 0,
                 weight_decay: float = 0, initial_accumulator_value: float = 0, eps: float = 1e-10,
                 foreach: bool | None = None, *, maximize: bool = False, differentiable: bool = False,
                 fused: bool | None = None, block_size: int = 256, min_8bit_size: int = 4096,
                 state: Literal["8bit"] = "8bit") -> None:
        self._q8_setup(block_size, min_8bit_size, state)
        super().__init__(params, lr, lr_decay, weight_decay, initial_accumulator_value, eps, foreach,
                         maximize=maximize, differentiable=differentiable, fused=fused)


eight_bit_form(Adagrad, Adagrad8bit)
