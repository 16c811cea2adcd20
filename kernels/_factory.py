"""A timm-style factory: an optimizer by name for a whole model, with the usual parameter groups.

    >>> from optadvisor import create_optimizer, list_optimizers
    >>> opt = create_optimizer(model, "adamw", lr=1e-3, weight_decay=0.05)       # no decay on biases and norms
    >>> list_optimizers("adam*")
    ['adam', 'adam8bit', 'adam_bf16state', 'adam_kahan', 'adamw', 'adamw8bit', ...]

Names: every optimizer of ``kernels``' catalog in lower case (``adam``, ``adamw``, ``sgd``, ``rmsprop``,
``adagrad``, ``adam8bit``, ``adamw8bit``, ``sgd8bit``, ``rmsprop8bit``); for those that take them, the variants
``<name>_bf16state`` (``state_dtype=torch.bfloat16``: bfloat16 moments, stochastic rounding) and
``<name>_kahan`` (``kahan_sum=True``: compensated bfloat16 weights); and timm's ``momentum`` (SGD, momentum 0.9)
and ``nesterov`` (SGD, Nesterov momentum 0.9). Unlike timm, ``sgd`` is torch's SGD (no momentum unless given).
``muon`` is :func:`kernels.muon_with_adamw` (Muon for hidden matrices, AdamW for the rest; ``kwargs`` go to
Muon); ``schedulefreeadamw`` must be put in train mode (``opt.train()``) before stepping, as its reference.

Groups:
- ``no_decay_bias_and_norm=True`` (timm's ``filter_bias_and_bn``): parameters of one dimension or fewer (biases,
  normalization gains and shifts) and any named in the model's ``no_weight_decay()`` get no weight decay; the
  rest get ``weight_decay``.
- ``layer_decay=d`` (layer-wise learning-rate decay, for fine-tuning): the model's top-level children, in order,
  are its layers (parameters directly on the model: layer 0); layer i of n gets ``lr x d ** (n - 1 - i)``, so
  the last layer (the head) trains at ``lr`` and earlier ones slower. Each group records its ``layer`` and
  ``lr_scale``.
Frozen parameters (``requires_grad=False``) are left out.
"""

from __future__ import annotations

import fnmatch
import inspect
from typing import Any

import torch

from . import _catalog as catalog

_TIMM_ALIASES = {"momentum": ("sgd", {"momentum": 0.9}), "nesterov": ("sgd", {"momentum": 0.9, "nesterov": True})}


def _registry() -> dict[str, tuple[type, dict[str, Any]]]:
    out: dict[str, tuple[type, dict[str, Any]]] = {}
    for e in catalog.optimizers():
        base = e.name.lower()
        out[base] = (e.cls, {})
        accepted = inspect.signature(e.cls).parameters
        if "state_dtype" in accepted and "bf16" in (e.params["state"].type if "state" in e.params else "bf16"):
            out[f"{base}_bf16state"] = (e.cls, {"state_dtype": torch.bfloat16})
        if "kahan_sum" in accepted:
            out[f"{base}_kahan"] = (e.cls, {"kahan_sum": True})
    for alias, (base, kwargs) in _TIMM_ALIASES.items():
        out[alias] = (out[base][0], dict(kwargs))
    return dict(sorted(out.items()))


def list_optimizers(pattern: str = "*") -> list[str]:
    """The names ``create_optimizer`` knows, matching a shell-style ``pattern`` (``"adam*"``), sorted."""
    if not isinstance(pattern, str):
        raise TypeError(f"list_optimizers: pattern must be a string (got {type(pattern).__name__})")
    return [n for n in _registry() if fnmatch.fnmatchcase(n, pattern.lower())]


def _no_decay_names(model: torch.nn.Module) -> set[str]:
    hook = getattr(model, "no_weight_decay", None)
    if hook is None:
        return set()
    names = hook()
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"create_optimizer: {type(model).__name__}.no_weight_decay() must return names of "
                        f"parameters (strings); got {names!r}")
    known = {n for n, _ in model.named_parameters()}
    unknown = sorted(set(names) - known)
    if unknown:
        raise ValueError(f"create_optimizer: {type(model).__name__}.no_weight_decay() names parameters the model "
                         f"does not have: {', '.join(unknown)}")
    return set(names)


def param_groups(model: torch.nn.Module, weight_decay: float, no_decay_bias_and_norm: bool = True,
                 layer_decay: float | None = None, lr: float | None = None,
                 no_decay_embeddings: bool = False) -> list[dict[str, Any]]:
    """The parameter groups ``create_optimizer`` builds (see the module's docstring); every trainable parameter
    is in exactly one group. ``no_decay_embeddings``: the weights of ``nn.Embedding`` / ``nn.EmbeddingBag``
    modules get no weight decay either (the usual transformer pre-training recipe)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"create_optimizer: model must be a torch.nn.Module (got {type(model).__name__})")
    if layer_decay is not None and not (isinstance(layer_decay, (int, float)) and 0 < layer_decay <= 1):
        raise ValueError(f"create_optimizer: layer_decay must be in (0, 1] or None (got {layer_decay!r})")
    skip = _no_decay_names(model) if no_decay_bias_and_norm else set()
    # by identity: a weight tied to an embedding (a language model's head) is the embedding's, whatever its name
    embeddings = {id(p) for m in model.modules() if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag))
                  for p in m.parameters(recurse=False)} if no_decay_embeddings else set()
    children = [name for name, _ in model.named_children()]
    n_layers = len(children) + 1  # layer 0: parameters directly on the model
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        head = name.split(".", 1)[0]
        layer = children.index(head) + 1 if "." in name and head in children else 0
        decay = not (no_decay_bias_and_norm and (p.ndim <= 1 or name in skip)) and id(p) not in embeddings
        key = (layer if layer_decay is not None else 0, decay)
        group = groups.setdefault(key, {"params": [], "param_names": [],
                                        "weight_decay": weight_decay if decay else 0.0})
        if layer_decay is not None:
            scale = float(layer_decay) ** (n_layers - 1 - layer)
            group.update(layer=layer, lr_scale=scale)
            if lr is not None:
                group["lr"] = lr * scale
        group["params"].append(p)
        group["param_names"].append(name)
    if not groups:
        raise ValueError(f"create_optimizer: {type(model).__name__} has no trainable parameters")
    return [groups[k] for k in sorted(groups)]


def create_optimizer(model: torch.nn.Module, name: str, lr: float | None = None, weight_decay: float | None = None,
                     no_decay_bias_and_norm: bool = True, layer_decay: float | None = None,
                     no_decay_embeddings: bool = False, **kwargs: Any):
    """A ``kernels`` optimizer named ``name`` over ``model``'s trainable parameters, grouped as the module's
    docstring says (``no_decay_embeddings=True``: no weight decay on ``nn.Embedding`` weights either).
    ``lr`` / ``weight_decay``: None keeps the optimizer's default; ``kwargs`` go to its constructor
    (``betas=...``, ``momentum=...``)."""
    reg = _registry()
    if not isinstance(name, str) or name.lower() not in reg:
        import difflib  # only for the message

        close = difflib.get_close_matches(str(name).lower(), list(reg), n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"create_optimizer: unknown optimizer {name!r}.{hint} Known: {', '.join(reg)}")
    cls, variant = reg[name.lower()]
    if cls.__name__ == "Muon":  # matrices only: Muon for the hidden ones, AdamW for the rest
        return _muon_hybrid(model, lr, weight_decay, layer_decay, no_decay_bias_and_norm, no_decay_embeddings,
                            kwargs)
    signature = inspect.signature(cls).parameters
    clash = sorted(set(kwargs) & set(variant))
    if clash:
        raise ValueError(f"create_optimizer: {name!r} sets {', '.join(clash)} itself; pass the base name "
                         f"{name.lower().split('_')[0]!r} to choose {', '.join(clash)}")
    unknown = sorted(set(kwargs) - set(signature))
    if unknown:
        raise TypeError(f"create_optimizer: {cls.__name__} takes no argument {', '.join(unknown)}")
    if weight_decay is None:
        weight_decay = signature["weight_decay"].default
    base_lr = signature["lr"].default if lr is None else lr
    groups = param_groups(model, weight_decay, no_decay_bias_and_norm, layer_decay, base_lr, no_decay_embeddings)
    for g in groups:
        del g["param_names"]
    options = {**variant, **kwargs, "weight_decay": weight_decay}
    if lr is not None:
        options["lr"] = lr
    return cls(groups, **options)


def _muon_hybrid(model: torch.nn.Module, lr: float | None, weight_decay: float | None, layer_decay: float | None,
                 no_decay_bias_and_norm: bool, no_decay_embeddings: bool, kwargs: dict[str, Any]):
    from .optim.hybrid import muon_with_adamw

    if layer_decay is not None or not no_decay_bias_and_norm:
        raise ValueError("create_optimizer: 'muon' builds kernels.muon_with_adamw (Muon for hidden matrices, "
                         "AdamW without decay on biases and norms); layer_decay and no_decay_bias_and_norm=False "
                         "do not apply: build the two optimizers yourself for those")
    return muon_with_adamw(model, 1e-3 if lr is None else lr, 0.1 if weight_decay is None else weight_decay,
                           muon_kwargs=kwargs, no_decay_embeddings=no_decay_embeddings)
