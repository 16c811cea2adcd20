"""Muon for a model's hidden matrices and AdamW for the rest, as one optimizer: one ``step()``, one
``param_groups`` list that schedulers drive, one ``state_dict()`` (:func:`muon_with_adamw`)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer

from .._runtime.state import check_state_dict_keys
from .._runtime.validate import run_closure
from .adam import AdamW
from .muon import Muon

Route = Callable[[str, torch.nn.Parameter], bool]


def _head_and_embeddings(model: torch.nn.Module) -> set[int]:
    """Ids of the weights Muon should not take by default: every embedding's, and the output head's — the
    last ``nn.Linear`` in module order, or any linear whose weight is an embedding's (tied)."""
    out: set[int] = set()
    linears = []
    for module in model.modules():
        if isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag)):
            out.add(id(module.weight))
        elif isinstance(module, torch.nn.Linear):
            linears.append(module)
    if linears:
        out.add(id(linears[-1].weight))
    return out


def split_for_muon(model: torch.nn.Module, route: Route | None = None) -> tuple[list[str], list[str]]:
    """The names of ``model``'s trainable parameters Muon takes, and those AdamW takes. By default Muon takes
    every 2-D weight but embeddings and the output head (the last ``nn.Linear``, or one tied to an
    embedding); AdamW the rest (embeddings, head, biases, norms' gains, convolution kernels — torch's Muon is
    for 2-D matrices). ``route(name, param) -> bool`` (True: Muon) replaces the rule; a parameter it sends to
    Muon that is not 2-D is refused by name."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"muon_with_adamw: model must be a torch.nn.Module (got {type(model).__name__})")
    skip = _head_and_embeddings(model)
    muon, adamw = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        to_muon = route(name, p) if route is not None else (p.ndim == 2 and id(p) not in skip)
        if not isinstance(to_muon, bool):
            raise TypeError(f"muon_with_adamw: route({name!r}, ...) returned {to_muon!r}; it must return a bool")
        if to_muon and p.ndim != 2:
            raise ValueError(f"muon_with_adamw: route sends {name!r} (shape {tuple(p.shape)}) to Muon, which "
                             "takes 2-D matrices only")
        (muon if to_muon else adamw).append(name)
    if not muon and not adamw:
        raise ValueError("muon_with_adamw: the model has no trainable parameters")
    return muon, adamw


class MuonWithAdamW(Optimizer):
    """Two optimizers that act as one: :class:`kernels.Muon` (``.muon``) and :class:`kernels.AdamW`
    (``.adamw``). ``param_groups`` is Muon's groups then AdamW's — the same dictionaries, so an LR scheduler
    (or the HF Trainer, or Lightning) that sets ``group["lr"]`` sets it for the optimizer that owns the
    group; ``state_dict()`` is one torch-format dict (Muon's parameters numbered first) and
    ``load_state_dict`` checks both halves before loading either. Build it with :func:`muon_with_adamw`."""

    def __init__(self, muon: Muon | None, adamw: AdamW | None) -> None:
        self.muon, self.adamw = muon, adamw
        self._parts = [o for o in (muon, adamw) if o is not None]
        params = [p for o in self._parts for g in o.param_groups for p in g["params"]]
        super().__init__(params, {})
        self.param_groups = [g for o in self._parts for g in o.param_groups]
        self._built = True

    @property
    def state(self) -> dict:  # type: ignore[override]
        """Both optimizers' state (a merged view: read it, edit the parts' own)."""
        merged: dict = {}
        for o in self.__dict__.get("_parts", ()):
            merged.update(o.state)
        return merged

    @state.setter
    def state(self, value: Any) -> None:  # Optimizer.__init__ sets one: each part keeps its own
        pass

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self.__dict__.get("_built"):
            raise ValueError("MuonWithAdamW: add a parameter group to .muon or .adamw (each checks its own)")
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = run_closure(closure)
        for o in self._parts:
            o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self._parts:
            o.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        state, groups, offset = {}, [], 0
        for o in self._parts:
            sd = o.state_dict()
            for g in sd["param_groups"]:
                groups.append({**g, "params": [i + offset for i in g["params"]]})
            state.update({i + offset: v for i, v in sd["state"].items()})
            offset += sum(len(g["params"]) for g in o.param_groups)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        check_state_dict_keys(state_dict)
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"loaded state dict has {len(groups)} parameter groups, this optimizer has "
                             f"{len(self.param_groups)}")
        parts, at = [], 0
        for o in self._parts:
            mine = groups[at:at + len(o.param_groups)]
            for gi, g in enumerate(mine):
                if ("ns_steps" in g) != isinstance(o, Muon):
                    raise ValueError(f"loaded state dict's parameter group {at + gi} is "
                                     f"{'Muon' if 'ns_steps' in g else 'AdamW'}'s; this optimizer's is "
                                     f"{type(o).__name__}'s")
            ids = {pid for g in mine for pid in g["params"]}
            parts.append({"param_groups": copy.deepcopy(mine),
                          "state": {pid: v for pid, v in state_dict["state"].items() if pid in ids}})
            at += len(o.param_groups)
        saved = [copy.deepcopy(o.state_dict()) for o in self._parts]
        done = []
        try:
            for o, sd in zip(self._parts, parts):
                o.load_state_dict(sd)
                done.append(o)
        except Exception:
            for o, sd in zip(done, saved):  # never half-loaded: the part loaded first is put back
                o.load_state_dict(sd)
            raise
        self.param_groups = [g for o in self._parts for g in o.param_groups]


def muon_with_adamw(model: torch.nn.Module, lr: float = 1e-3, weight_decay: float = 0.1, *,
                    route: Route | None = None, adjust_lr_fn: str | None = "match_rms_adamw",
                    muon_kwargs: dict[str, Any] | None = None, adamw_kwargs: dict[str, Any] | None = None,
                    no_decay_embeddings: bool = False, fused: bool | None = None) -> MuonWithAdamW:
    """Muon for ``model``'s hidden matrices, AdamW for the rest (see :func:`split_for_muon`), as one
    optimizer. One learning rate and weight decay serve both: Muon's updates are scaled by
    ``adjust_lr_fn="match_rms_adamw"`` (``0.2 sqrt(max(rows, cols))``, Liu et al. 2025) so that their RMS
    matches AdamW's and AdamW's tuned values carry over. AdamW decays only tensors of two or more dimensions
    (not biases and norms' gains; nor embeddings with ``no_decay_embeddings=True``). ``muon_kwargs``/``adamw_kwargs`` pass anything else to either optimizer
    (e.g. ``adamw_kwargs={"betas": (0.9, 0.95)}``, ``muon_kwargs={"lr": 0.02, "adjust_lr_fn": None}``).

    Example::

        >>> opt = kernels.muon_with_adamw(model, lr=1e-3, weight_decay=0.1)
        >>> sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)  # drives both
    """
    muon_names, adamw_names = split_for_muon(model, route)
    named = dict(model.named_parameters())
    muon = Muon([named[n] for n in muon_names], **{"lr": lr, "weight_decay": weight_decay,
                                                  "adjust_lr_fn": adjust_lr_fn, "fused": fused,
                                                  **(muon_kwargs or {})}) if muon_names else None
    embeddings = {id(m.weight) for m in model.modules()
                  if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag))} if no_decay_embeddings else set()
    decay = [named[n] for n in adamw_names if named[n].ndim >= 2 and id(named[n]) not in embeddings]
    no_decay = [named[n] for n in adamw_names if named[n].ndim < 2 or id(named[n]) in embeddings]
    groups = [g for g in ({"params": decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    adamw = AdamW(groups, **{"lr": lr, "weight_decay": weight_decay, "fused": fused,
                             **(adamw_kwargs or {})}) if groups else None
    return MuonWithAdamW(muon, adamw)
