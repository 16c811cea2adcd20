"""Adafactor (Shazeer & Stern 2018), as torch.optim.Adafactor: factored second moments (a row and a column
statistic per matrix: sub-linear state), relative step sizes, update clipping. Its signature, defaults,
messages and state; the update written here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer

from .._catalog import register
from .._runtime.state import check_state_dict_keys
from .._runtime.validate import run_closure


def _check_eps(eps: Any) -> tuple[float | None, float]:
    if not isinstance(eps, (tuple, list)) or len(eps) != 2:
        size = len(eps) if isinstance(eps, (tuple, list)) else type(eps).__name__
        raise ValueError(f"Adafactor: eps must be a pair (epsilon1 or None, epsilon2), got {eps!r} ({size}); "
                         "torch.optim.Adafactor fails at its first step with 'too many values to unpack' or "
                         "'not enough values to unpack' for it")
    if eps[0] is not None and not 0.0 <= eps[0]:
        raise ValueError(f"epsilon1 should be >= 0 but is: {eps[0]}")
    if not 0.0 <= eps[1]:
        raise ValueError(f"epsilon2 should be >= 0 but is: {eps[1]}")
    return eps[0], eps[1]


def _step_one(p: torch.Tensor, g: torch.Tensor, state: dict[str, torch.Tensor], lr: float, beta2_decay: float,
              eps1: float | None, eps2: float, d: float, weight_decay: float, maximize: bool) -> None:
    # torch.optim.Adafactor's for-loop path, op for op (bit for bit with it)
    if maximize:
        g = -g
    if eps1 is None:
        eps1 = torch.finfo(p.dtype).eps
    step_t = state["step"]
    step_t += 1
    if p.numel() == 0:  # nothing to update (torch's divides by the size and raises ZeroDivisionError)
        return
    step = step_t.item()
    one_minus_beta2 = step ** beta2_decay
    rho = min(lr, 1 / (step ** 0.5))
    alpha = max(eps2, p.norm(2).item() / (p.numel() ** 0.5)) * rho
    if weight_decay != 0:
        p.mul_(1 - lr * weight_decay)
    if g.dim() > 1:
        row_var, col_var = state["row_var"], state["col_var"]
        row_var.lerp_(torch.norm(g, dim=-1, keepdim=True).square_().div_(g.size(-1)), one_minus_beta2)
        col_var.lerp_(torch.norm(g, dim=-2, keepdim=True).square_().div_(g.size(-2)), one_minus_beta2)
        estimate = row_var @ col_var
        estimate.div_(row_var.mean(dim=-2, keepdim=True).clamp_(min=eps1))
    else:
        variance = state["variance"]
        variance.lerp_(g * g, one_minus_beta2)
        estimate = variance.clone()
    update = estimate.clamp_(min=eps1 * eps1).rsqrt_()
    update.mul_(g)
    denom = max(1.0, update.norm(2).item() / ((update.numel() ** 0.5) * d))
    p.add_(update, alpha=-alpha / denom)


@register("optimizer", torch="torch.optim.Adafactor", default_candidate=False,
          configs={"Adafactor": (dict(lr=1e-2), None)})
class Adafactor(Optimizer):
    r"""Adafactor (Shazeer & Stern 2018): a drop-in for :class:`torch.optim.Adafactor` — the memory-frugal
    choice for large transformers. A matrix keeps a row and a column statistic of its squared gradients
    (``m + n`` numbers, not ``m n``): state memory is sub-linear.

    .. math::
        \hat\beta_{2,t} = 1 - t^{c},\quad \rho_t = \min(\gamma, 1/\sqrt t),\quad
        \alpha_t = \max(\epsilon_2, \mathrm{RMS}(\theta_{t-1}))\,\rho_t \\
        R_t = \hat\beta_{2,t} R_{t-1} + (1-\hat\beta_{2,t})\,\overline{g_t^2}^{\,\mathrm{cols}},\quad
        C_t = \hat\beta_{2,t} C_{t-1} + (1-\hat\beta_{2,t})\,\overline{g_t^2}^{\,\mathrm{rows}},\quad
        \hat V_t = R_t C_t / \overline{R_t} \\
        U_t = g_t / \sqrt{\max(\hat V_t, \epsilon_1^2)},\quad
        \theta_t = \theta_{t-1}(1-\gamma\lambda) - \alpha_t\, U_t / \max(1, \mathrm{RMS}(U_t)/d)

    (vectors keep a plain ``variance`` instead of ``R``/``C``). Args: as torch.optim.Adafactor — ``params``,
    ``lr=1e-2`` (the cap of the relative step ``ρ``), ``beta2_decay=-0.8`` (``c``), ``eps=(None, 1e-3)``
    (``ε1``: None is the dtype's machine epsilon; ``ε2``), ``d=1.0`` (the update clipping threshold),
    ``weight_decay=0.0``, keyword-only ``foreach`` (accepted and ignored) and ``maximize=False``. An ``eps``
    that is not a pair is refused when the optimizer is built (torch fails at its first step). State:
    ``step``, ``row_var``/``col_var`` (matrices and higher: the last two dimensions are factored) or
    ``variance``; checkpoints interchange both ways. No low-precision state variants: the factored state is
    already ``O(m + n)``, and the parameters' RMS and the update's RMS are reductions, not an elementwise pass
    the codecs could wrap. Complex parameters and sparse gradients are refused as torch refuses them.

    Example::

        >>> import torch

        >>> from optadvisor import kernels
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = kernels.Adafactor(model.parameters(), lr=1e-2)
        >>> model(torch.randn(8, 4)).pow(2).mean().backward(); opt.step(); opt.zero_grad()

    References: N. Shazeer, M. Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost",
    ICML 2018.
    """

    def __init__(self, params: Any, lr: float | torch.Tensor = 1e-2, beta2_decay: float = -0.8,
                 eps: tuple[float | None, float] = (None, 1e-3), d: float = 1.0, weight_decay: float = 0.0, *,
                 foreach: bool | None = None, maximize: bool = False) -> None:
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Learning rate should be >= 0 but is: {lr}")
        if not 0.0 >= beta2_decay:
            raise ValueError(f"beta2_decay should be <= 0 but is: {beta2_decay}")
        _check_eps(eps)
        if not 1.0 <= d:
            raise ValueError(f"Clipping threshold d should be >= 1 but is: {d}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"weight_decay should be >= 0 but is: {weight_decay}")
        defaults = dict(lr=lr, beta2_decay=beta2_decay, eps=eps, d=d, weight_decay=weight_decay, foreach=foreach,
                        maximize=maximize)
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("foreach", None)
            for p in group["params"]:
                st = self.state.get(p, {})
                if st and not torch.is_tensor(st["step"]):
                    st["step"] = torch.tensor(float(st["step"]), dtype=torch.float32)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's, with each parameter's state checked first (its keys and shapes for the parameter's rank):
        a bad checkpoint is refused by name and the optimizer stays as it was."""
        check_state_dict_keys(state_dict)
        ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        if len(ids) != len(params) or len(state_dict["param_groups"]) != len(self.param_groups):
            raise ValueError("loaded state dict's groups or parameters do not match this optimizer's "
                             f"({len(state_dict['param_groups'])} groups, {len(ids)} parameters; this optimizer: "
                             f"{len(self.param_groups)}, {len(params)})")
        for g in state_dict["param_groups"]:
            _check_eps(g.get("eps"))
        for n, (pid, p) in enumerate(zip(ids, params)):
            st = state_dict["state"].get(pid)
            if not st:
                continue
            step = st.get("step")
            if not isinstance(step, (int, float, torch.Tensor)) or isinstance(step, bool) or (
                    isinstance(step, torch.Tensor) and step.numel() != 1):
                raise ValueError(f"state of parameter {n} lacks a scalar 'step'")
            for key, shape in _state_shapes(p).items():
                if key == "step":
                    continue
                v = st.get(key)
                if not isinstance(v, torch.Tensor) or tuple(v.shape) != shape:
                    got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                    raise ValueError(f"state of parameter {n}: {key!r} must be a tensor of shape {shape} for a "
                                     f"parameter of shape {tuple(p.shape)} (got {got})")
        super().load_state_dict(state_dict)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step; ``closure`` re-evaluates the model and returns the loss."""
        loss = run_closure(closure)
        for group in self.param_groups:
            eps1, eps2 = _check_eps(group["eps"])
            lr = float(group["lr"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                if torch.is_complex(p):
                    raise RuntimeError("Adafactor does not support complex parameters")
                if p.grad.is_sparse:
                    raise RuntimeError("Adafactor does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    for key, shape in _state_shapes(p).items():
                        if key != "step":
                            state[key] = p.grad.new_zeros(shape)
                _step_one(p, p.grad, state, lr, group["beta2_decay"], eps1, eps2, group["d"],
                          group["weight_decay"], group["maximize"])
        return loss


def _state_shapes(p: torch.Tensor) -> dict[str, tuple[int, ...]]:
    if p.dim() > 1:
        return {"step": (), "row_var": (*p.shape[:-1], 1), "col_var": (*p.shape[:-2], 1, p.shape[-1])}
    return {"step": (), "variance": tuple(p.shape)}
