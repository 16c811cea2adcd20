"""8-bit block-wise quantized optimizer state: ``kernels.Adam8bit``, ``AdamW8bit``, ``SGD8bit`` and
``RMSprop8bit``.

The names are bitsandbytes' (``bnb.optim.Adam8bit``, ``SGD8bit``, ``RMSprop8bit``; torchao's
``AdamW8bit``), and so are the two arguments beyond torch's signatures: ``block_size`` (elements per
quantization block, 256) and ``min_8bit_size`` (bitsandbytes': parameters with fewer elements keep float
state, 4096). The codes and their maps are in ``precision.q8math``; the CPU kernel is ``_runtime/native.c`` (loaded
by ``_runtime.native``). :class:`Blockwise8bit` (``precision.blockwise``) holds what the four share: which parameters are quantized, the
block-aligned layout, checkpoints in both directions, and the choice of path for a step.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from .._catalog import register
from .._runtime.layout import Bucket
from ..precision.accelerators import register_accelerator
from ..precision.bf16 import eight_bit_form
from ..precision.blockwise import Blockwise8bit, q8_native
from ..precision.codecs import blockwise_8bit
from ..precision.q8math import (
    INV_127_SQ,
    Q8Scalars,
    adam8bit_update,
    rmsprop8bit_update,
)
from .adam import Adam, AdamW, _adam_fused
from .rmsprop import RMSprop, _rmsprop_fused
from .sgd import SGD, _sgd_fused


# pragma: no mutate start (compiled by torch.compile, which cannot trace mutmut's trampolines)
def _adam8bit_update(hp, maximize, wd_mode, _unused, block, p, g, cm, sm, cv, sv):
    adam8bit_update(hp, maximize, wd_mode, block, p, g, cm, sm, cv, sv)
# pragma: no mutate end


# torch's counterpart is the same update with float state (what the benchmarks compare against)
@register("optimizer", torch="torch.optim.Adam", default_candidate=False,
          configs={"Adam8bit": (dict(lr=1e-3), 16)})
class Adam8bit(Blockwise8bit, Adam):
    r"""Adam with 8-bit state: the two moments stored as 8-bit codes with a float32 scale per block.

    .. math::
        m_t &= \beta_1 \hat m_{t-1} + (1-\beta_1) g_t,\quad v_t = \beta_2 \hat v_{t-1} + (1-\beta_2) g_t^2,\quad
        \theta_t = \theta_{t-1} - \frac{\gamma}{1-\beta_1^t}\,\frac{m_t}{\sqrt{v_t}/\sqrt{1-\beta_2^t}+\epsilon} \\
        \hat m_t &= \operatorname{sign}(c)\,(c/127)^2 a_m,\quad c = \operatorname{round}\big(127\sqrt{|m_t|/a_m}\big),
        \quad \hat v_t = \big((d+1)/256\big)^2 a_v,\quad d = \operatorname{round}\big(256\sqrt{v_t/a_v}\big) - 1
        \in [0, 255]

    with :math:`a_m, a_v` the largest finite :math:`|m_t|, v_t` of the block (weight decay and ``maximize``
    as in :class:`Adam`).

    The update is Adam's (:class:`Adam`), in float32, on this step's moments; only what is kept between
    steps is quantized: 2 bytes per parameter plus 8 per block of ``block_size`` (fp32 Adam: 8 bytes), so
    a step reads and writes 16 bytes per float32 parameter instead of 28. See ``kernels.precision.q8math`` for the
    maps (square-root companding: the first moment signed, the second's levels exclude zero).

    Args: as :class:`torch.optim.Adam`, plus keyword-only ``block_size=256`` (1..4096; each parameter
    starts a new block, so it need not divide anything) and ``min_8bit_size=4096`` (parameters with fewer
    elements keep float state, as bitsandbytes does: biases and norms are a small share of the memory and
    the most sensitive to rounding). ``amsgrad=True`` is refused. Parameters must be float32, bfloat16 or
    float16 (float64 and complex parameters are refused: use :class:`Adam`); DTensor (FSDP2) parameters
    are refused.

    ``state_dict()`` saves, per quantized parameter, ``exp_avg`` (int8 codes shaped as the parameter),
    ``exp_avg_absmax`` (float32, one per block), ``exp_avg_sq`` (uint8) and ``exp_avg_sq_absmax``, and
    ``block_size`` in its groups. ``load_state_dict`` takes these back exactly, and takes a float state
    dict (``torch.optim.Adam``'s, or :class:`Adam`'s) by quantizing it; :class:`Adam` loads an 8-bit one by
    dequantizing it, and :func:`dequantize_state_dict` makes one that ``torch.optim.Adam`` loads.

    A NaN or inf gradient element makes its parameter element NaN/inf in that step, as with torch's Adam;
    its moments are stored as 0 (no code holds NaN) and are left out of the block's scale, so the other
    elements of its block, and other blocks, are unaffected.

    On the CPU (float32 and bfloat16 parameters) the step is one pass of a C kernel built on first use
    (``kernels._runtime.native``; ``OPTADVISOR_NATIVE=0`` or no C compiler: the same math in torch ops, slower);
    elsewhere, and with ``fused=False``, the torch-op path (compiled where ``fused`` allows).

    Example::

        >>> import torch

        >>> from optadvisor import kernels
        >>> model = torch.nn.Linear(128, 64)
        >>> opt = kernels.Adam8bit(model.parameters(), lr=1e-3)
        >>> model(torch.randn(8, 128)).pow(2).mean().backward(); opt.step(); opt.zero_grad()
        >>> opt.state[model.weight]["exp_avg"].dtype
        torch.int8

    References: T. Dettmers, M. Lewis, S. Shleifer, L. Zettlemoyer, "8-bit Optimizers via Block-wise
    Quantization", ICLR 2022; B. Li, J. Chen, J. Zhu, "Memory Efficient Optimizers with 4-bit States",
    NeurIPS 2023 (zero excluded from the second moment's map).
    """

    def __init__(self, params: Any, lr: float | torch.Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0,
                 amsgrad: bool = False, *, foreach: bool | None = None, maximize: bool = False,
                 capturable: bool = False, differentiable: bool = False, fused: bool | None = None,
                 decoupled_weight_decay: bool = False, block_size: int = 256, min_8bit_size: int = 4096,
                 state: Literal["8bit"] = "8bit") -> None:
        if amsgrad:
            raise ValueError(f"{type(self).__name__}: amsgrad=True is not supported with 8-bit state (a third "
                             "quantized moment); use kernels.Adam(amsgrad=True)")
        self._q8_setup(block_size, min_8bit_size, state)
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=decoupled_weight_decay)

    _q8_update = staticmethod(_adam8bit_update)
    _adam8bit_update.exact_shapes = True  # (see precision/q8math.py)
    _adam8bit_update.eager_cost = 6

    def _q8_scalars(self, s: Any) -> tuple[float, ...]:
        return Q8Scalars(s.step_size, s.one_minus_beta1, s.beta2, s.one_minus_beta2, s.weight_decay,
                         s.decay_factor, 1.0 / s.bc2_sqrt, s.eps, INV_127_SQ)

    def _q8_flags(self, flags: tuple) -> tuple[bool, int, bool]:
        _, maximize, wd_mode = flags
        return maximize, wd_mode, False


@register("optimizer", torch="torch.optim.AdamW", default_candidate=False,
          configs={"AdamW8bit": (dict(lr=1e-3), 16)})
class AdamW8bit(Adam8bit):
    r""":class:`Adam8bit` with decoupled weight decay, default 1e-2: AdamW's update (:class:`AdamW`) with
    8-bit state. Arguments as :class:`torch.optim.AdamW`, plus ``block_size`` and ``min_8bit_size``.

    .. math::
        \theta_t = \theta_{t-1}(1-\gamma\lambda)
                   - \frac{\gamma}{1-\beta_1^t}\,\frac{m_t}{\sqrt{v_t}/\sqrt{1-\beta_2^t} + \epsilon}
        \quad (m_t, v_t \text{ and their 8-bit codes as in } :class:`Adam8bit`)

    Example::

        >>> opt = kernels.AdamW8bit(model.parameters(), lr=1e-3, weight_decay=0.01)

    References: T. Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022;
    I. Loshchilov, F. Hutter, "Decoupled Weight Decay Regularization", ICLR 2019.
    """

    def __init__(self, params: Any, lr: float | torch.Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 amsgrad: bool = False, *, maximize: bool = False, foreach: bool | None = None,
                 capturable: bool = False, differentiable: bool = False, fused: bool | None = None,
                 block_size: int = 256, min_8bit_size: int = 4096,
                 state: Literal["8bit"] = "8bit") -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, block_size=block_size, min_8bit_size=min_8bit_size,
                         state=state)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True


@register("optimizer", torch="torch.optim.SGD", default_candidate=False,
          configs={"SGD8bit-momentum": (dict(lr=0.01, momentum=0.9), 14)})
class SGD8bit(Blockwise8bit, SGD):
    r"""SGD with momentum, the momentum buffer stored as 8-bit codes with a float32 scale per block.

    .. math::
        b_t = \mu \hat b_{t-1} + (1-\tau) g_t \;(b_1 = g_1),\quad
        \theta_t = \theta_{t-1} - \gamma\,(g_t + \mu b_t \text{ if nesterov else } b_t),\quad
        \hat b_t = \operatorname{sign}(c)\,(c/127)^2 a_b

    with :math:`c` and :math:`a_b` as :class:`Adam8bit`'s first moment (weight decay and ``maximize`` as in
    :class:`SGD`). The buffer takes 1 byte per parameter plus 4 per block instead of 4: a step reads and
    writes 14 bytes per float32 parameter instead of 20.

    Args: as :class:`torch.optim.SGD`, plus keyword-only ``block_size=256`` and ``min_8bit_size=4096`` (see
    :class:`Adam8bit`). With ``momentum=0`` there is no state, and this is :class:`SGD`. Parameters must be
    float32, bfloat16 or float16; DTensor parameters are refused.

    ``state_dict()`` saves ``momentum_buffer`` as int8 codes with ``momentum_buffer_absmax``; a float
    checkpoint (``torch.optim.SGD``'s) is quantized on load, :class:`SGD` loads this one dequantized, and
    :func:`dequantize_state_dict` makes one that ``torch.optim.SGD`` loads.

    Example::

        >>> opt = kernels.SGD8bit(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)

    References: T. Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022 (bitsandbytes'
    ``SGD8bit``).
    """

    def __init__(self, params: Any, lr: float | torch.Tensor = 1e-3, momentum: float = 0,
                 dampening: float = 0, weight_decay: float = 0, nesterov: bool = False, *,
                 maximize: bool = False, foreach: bool | None = None, differentiable: bool = False,
                 fused: bool | None = None, block_size: int = 256, min_8bit_size: int = 4096,
                 state: Literal["8bit"] = "8bit") -> None:
        self._q8_setup(block_size, min_8bit_size, state)
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov, maximize=maximize,
                         foreach=foreach, differentiable=differentiable, fused=fused)

    # no 8-bit update written for it: the codec around SGD's, which gives the C kernel's bits (tested)
    _q8_update = staticmethod(blockwise_8bit(_sgd_fused))

    def _q8_scalars(self, s: Any) -> tuple[float, ...]:
        return (*s, INV_127_SQ)

    def _q8_flags(self, flags: tuple) -> tuple[bool, int, bool]:
        maximize, decay, _, nesterov = flags
        return maximize, int(decay), nesterov


@register("optimizer", torch="torch.optim.RMSprop", default_candidate=False,
          configs={"RMSprop8bit": (dict(lr=1e-3), 14), "RMSprop8bit-momentum": (dict(lr=1e-3, momentum=0.9), 16)})
class RMSprop8bit(Blockwise8bit, RMSprop):
    r"""RMSprop with its square average (and momentum buffer) stored as 8-bit codes with a float32 scale
    per block.

    .. math::
        v_t = \alpha \hat v_{t-1} + (1-\alpha) g_t^2,\quad q_t = g_t / (\sqrt{v_t} + \epsilon),\quad
        b_t = \mu \hat b_{t-1} + q_t,\quad \theta_t = \theta_{t-1} - \gamma b_t
        \quad(\text{without momentum: } \theta_t = \theta_{t-1} - \gamma q_t)

    with :math:`\hat v` coded as :class:`Adam8bit`'s second moment (levels exclude zero) and :math:`\hat b`
    as its first. ``centered=True`` is refused: it divides by :math:`\sqrt{v - \bar g^2}`, a difference of
    two averages that 8-bit codes cannot resolve where the variance is small next to :math:`\bar g^2`
    (bitsandbytes refuses it too).

    Args: as :class:`torch.optim.RMSprop`, plus keyword-only ``block_size=256`` and ``min_8bit_size=4096``
    (see :class:`Adam8bit`). Parameters must be float32, bfloat16 or float16; DTensor parameters are refused.

    ``state_dict()`` saves ``square_avg`` (uint8) and ``momentum_buffer`` (int8) with their ``*_absmax``
    scales; float checkpoints are quantized on load, :class:`RMSprop` loads these dequantized, and
    :func:`dequantize_state_dict` makes one that ``torch.optim.RMSprop`` loads.

    Example::

        >>> opt = kernels.RMSprop8bit(model.parameters(), lr=1e-3, momentum=0.9)

    References: T. Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022 (bitsandbytes'
    ``RMSprop8bit``); G. Hinton, "Neural Networks for Machine Learning", lecture 6e (2012).
    """

    def __init__(self, params: Any, lr: float | torch.Tensor = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0, momentum: float = 0, centered: bool = False,
                 capturable: bool = False, foreach: bool | None = None, maximize: bool = False,
                 differentiable: bool = False, *, fused: bool | None = None, block_size: int = 256,
                 min_8bit_size: int = 4096,
                 state: Literal["8bit"] = "8bit") -> None:
        if centered:
            raise ValueError(f"{type(self).__name__}: centered=True is not supported with 8-bit state (it "
                             "divides by sqrt(square_avg - grad_avg^2), a difference 8-bit codes cannot "
                             "resolve); use kernels.RMSprop(centered=True), or state_dtype=torch.bfloat16 there")
        self._q8_setup(block_size, min_8bit_size, state)
        super().__init__(params, lr, alpha, eps, weight_decay, momentum, centered, capturable, foreach, maximize,
                         differentiable, fused=fused)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if isinstance(param_group, dict) and param_group.get("centered"):
            raise ValueError(f"{type(self).__name__}: parameter group {len(self.param_groups)}: centered=True "
                             "is not supported with 8-bit state; use kernels.RMSprop(centered=True)")
        super().add_param_group(param_group)

    _q8_update = staticmethod(rmsprop8bit_update)

    def _q8_scalars(self, s: Any) -> tuple[float, ...]:
        return (*s, INV_127_SQ)

    def _bucket_init(self, bucket: Bucket, group: dict[str, Any]) -> dict[str, Any]:
        if group["centered"]:  # set by hand after construction
            raise ValueError(f"{type(self).__name__}: param_groups[{bucket.group_index}]['centered'] is True; "
                             "centered=True is not supported with 8-bit state; use kernels.RMSprop(centered=True)")
        return super()._bucket_init(bucket, group)

    def _q8_flags(self, flags: tuple) -> tuple[bool, int, bool]:
        maximize, decay, use_momentum, _ = flags
        return maximize, int(decay), use_momentum


for _float, _eight in ((Adam, Adam8bit), (AdamW, AdamW8bit), (SGD, SGD8bit), (RMSprop, RMSprop8bit)):
    eight_bit_form(_float, _eight)


# the C kernels (kernels/_runtime/native.c), accelerators of these updates with 8-bit state
for _update, _kind in ((_adam_fused, 0), (_sgd_fused, 1), (_rmsprop_fused, 2)):
    register_accelerator(_update, "8bit", q8_native(_kind))
