"""``profile_data``: facts about a task read off its data (and model), each inference explained.

Data may be tensors, numpy arrays, a ``torch.utils.data.Dataset`` or a ``DataLoader``; it is streamed
batch by batch, so memory stays bounded whatever the data set's size: counts and distinct values are exact
(distinct values up to 1,000), robust statistics of a regression target (quartiles, median absolute
deviation) come from a fixed-size uniform reservoir sample of 100,000 targets (exact below that size).

Outliers (documented rule): a regression target is an outlier when it lies more than 3 IQR beyond the
quartiles (Tukey's "far out" fence); the target's robust scale is 1.4826 x MAD (Huber's delta follows it).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from ._profile import TaskProfile

_RESERVOIR = 100_000
_DISTINCT_CAP = 1_000


class DataProfile(BaseModel):
    """What ``profile_data`` found: the facts (a TaskProfile, what ``advise`` reads) and the evidence."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    facts: TaskProfile
    evidence: dict[str, str]
    nan_in_features: int
    nan_in_target: int
    class_labels: list[int] | None = None
    """Classification with labels other than 0..K-1: the label of each class index, in sorted order."""

    def explain(self) -> str:
        lines = ["Data profile:"] + [f"  {k}: {v}" for k, v in self.evidence.items()]
        return "\n".join(lines)


def _batches(X: Any, y: Any, batch: int = 65536) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    if y is None:  # a Dataset of (x, y) samples, or a DataLoader of (x, y) batches
        loader = X
        if isinstance(X, torch.utils.data.Dataset):  # map-style or iterable: batched here
            loader = torch.utils.data.DataLoader(X, batch_size=1024)
        for item in loader:
            if not isinstance(item, (tuple, list)) or len(item) < 2:
                raise ValueError("profile_data: a Dataset/DataLoader must yield (features, target) pairs")
            yield torch.as_tensor(item[0]), torch.as_tensor(item[1])
        return
    try:
        Xt, yt = torch.as_tensor(X), torch.as_tensor(y)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError("profile_data: X and y must be numeric tensors or arrays (encode string labels as "
                        f"integers first): {exc}") from None
    if Xt.shape[0] != yt.shape[0]:
        raise ValueError(f"profile_data: X has {Xt.shape[0]} rows but y has {yt.shape[0]}")
    for i in range(0, Xt.shape[0], batch):
        yield Xt[i:i + batch], yt[i:i + batch]


_NORMS = (torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.RMSNorm,
          torch.nn.LocalResponseNorm)
_ATTENTION = (torch.nn.MultiheadAttention, torch.nn.TransformerEncoderLayer, torch.nn.TransformerDecoderLayer)


def _param_kind(module: torch.nn.Module) -> str:
    if isinstance(module, torch.nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(module, torch.nn.Linear):
        return "linear"
    if isinstance(module, _NORMS):
        return "norm"
    if isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag)):
        return "embedding"
    if isinstance(module, torch.nn.MultiheadAttention):
        return "attention"
    if isinstance(module, torch.nn.RNNBase):
        return "recurrent"
    return "other"


class ModelProfile(BaseModel):
    """What ``profile_model`` found: the facts a rule reads (``n_params``, ``model_kind``, ``memory_gb``), the
    evidence of each, the trainable parameters counted by the kind of module that owns them (``conv``,
    ``linear``, ``norm``, ``embedding``, ``attention`` — MultiheadAttention's own projections —, ``recurrent``,
    ``other``: parameters a custom module holds itself) and whether the model has attention layers."""

    facts: dict[str, Any]
    evidence: dict[str, str]
    params_by_kind: dict[str, int]
    attention: bool

    def explain(self) -> str:
        kinds = ", ".join(f"{k} {n:,}" for k, n in self.params_by_kind.items() if n)
        return "\n".join(["Model profile:"] + [f"  {k}: {v}" for k, v in self.evidence.items()]
                         + [f"  parameters by kind: {kinds}"])


def profile_model(model: torch.nn.Module) -> ModelProfile:
    """The facts a ``torch.nn.Module`` gives: its trainable parameter count, its family (attention layers:
    transformer; recurrent layers: rnn; convolutions: cnn; one Linear: linear; Linear layers: mlp) and the memory
    free where it lives, with the parameters counted by kind.

    Example::

        >>> prof = profile_model(net)
        >>> advise(task="classification", **prof.facts)
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"profile_model: model must be a torch.nn.Module (got {type(model).__name__})")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("profile_model: the model has no trainable parameters (all frozen, or none at all)")
    by_kind = dict.fromkeys(("conv", "linear", "norm", "embedding", "attention", "recurrent", "other"), 0)
    seen: set[int] = set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:  # a shared (tied) parameter counts once
                seen.add(id(p))
                by_kind[_param_kind(module)] += p.numel()
    n_params = sum(by_kind.values())
    kinds = Counter(type(m).__name__ for m in model.modules())
    attention = any(isinstance(m, _ATTENTION) for m in model.modules())
    if attention:
        kind, why = "transformer", "it has attention layers"
    elif any(isinstance(m, torch.nn.RNNBase) for m in model.modules()):
        kind, why = "rnn", "it has recurrent layers (RNN/LSTM/GRU)"
    elif any(isinstance(m, torch.nn.modules.conv._ConvNd) for m in model.modules()):
        kind, why = "cnn", "it has convolution layers"
    elif kinds.get("Linear", 0) == 1 and sum(1 for m in model.modules() if not list(m.children())) <= 2:
        kind, why = "linear", "it is a single Linear layer"
    elif kinds.get("Linear", 0) >= 2:
        kind, why = "mlp", f"it stacks {kinds['Linear']} Linear layers"
    else:
        kind, why = "other", "no attention, recurrent, convolution or Linear layers recognized"
    facts: dict[str, Any] = {"n_params": n_params, "model_kind": kind}
    evidence = {"n_params": f"{n_params:,} trainable parameters", "model_kind": f"{kind}: {why}"}
    memory = _free_memory(params[0].device)
    if memory is not None:
        facts["memory_gb"] = memory[0]
        evidence["memory_gb"] = memory[1]
    return ModelProfile(facts=facts, evidence=evidence, params_by_kind=by_kind, attention=attention)


def _free_memory(device: torch.device) -> tuple[float, str] | None:
    """Memory free for training where the model lives, in GiB (CUDA: the device's free memory; CPU: the
    host's MemAvailable), with how it was read; None where it cannot be read."""
    try:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return free / 2**30, f"{free / 2**30:.1f} GiB free on {device} (torch.cuda.mem_get_info)"
        if device.type == "cpu":
            with open("/proc/meminfo") as fh:
                for line in fh:
                    if line.startswith("MemAvailable:"):
                        gb = int(line.split()[1]) / 2**20
                        return gb, f"{gb:.1f} GiB available on the host (/proc/meminfo MemAvailable)"
    except (OSError, RuntimeError, ValueError):
        return None
    return None


def profile_data(X: Any, y: Any = None, model: torch.nn.Module | None = None,
                 task: str | None = None) -> DataProfile:
    """Infer a TaskProfile from data (and optionally the model), explaining each inference.

    ``X, y``: tensors or arrays of matching length; or ``X`` a Dataset/DataLoader of (features, target)
    and ``y=None``. ``task`` forces "regression" or "classification" instead of inferring it.

    Example::

        >>> prof = profile_data(X, y, model=net)
        >>> rec = advise(prof)
    """
    if task not in (None, "regression", "classification"):
        raise ValueError(f"profile_data: task must be 'regression' or 'classification' (got {task!r})")
    n = 0
    n_features = None
    nan_x = nan_y = 0
    zeros_x = entries_x = 0
    inf_found = False
    integral = True
    distinct: set[float] = set()
    counts: Counter = Counter()
    reservoir: list[float] = []
    seen = 0
    rng = random.Random(0)
    for xb, yb in _batches(X, y):
        if not (xb.is_floating_point() or xb.dtype in (torch.int64, torch.int32, torch.int16, torch.int8,
                                                       torch.uint8, torch.bool)):
            raise TypeError(f"profile_data: features must be numeric (got {xb.dtype})")
        if yb.is_complex():
            raise TypeError(f"profile_data: the target must be real (got {yb.dtype})")
        feats = xb[0].numel() if xb.dim() > 1 else 1
        if n_features is None:
            n_features = feats
        elif feats != n_features:
            raise ValueError(f"profile_data: rows have {n_features} and {feats} features")
        nan_b = 0
        if xb.is_floating_point():
            nan_b = int(torch.isnan(xb).sum())
            nan_x += nan_b
            inf_found |= bool(torch.isinf(xb).any())
        zeros_x += int((xb == 0).sum())
        entries_x += xb.numel() - nan_b
        yf = yb.reshape(yb.shape[0], -1)
        if yf.shape[1] != 1:
            raise ValueError(f"profile_data: one target per example expected (got {yf.shape[1]})")
        yv = yf[:, 0].double()
        nan_mask = torch.isnan(yv)
        nan_y += int(nan_mask.sum())
        yv = yv[~nan_mask]
        if bool(torch.isinf(yv).any()):
            raise ValueError("profile_data: the target has infinite values; fix or drop them first")
        n += yb.shape[0]
        if yb.is_floating_point() and yv.numel():
            integral &= bool((yv == torch.round(yv)).all())
        if len(distinct) <= _DISTINCT_CAP:
            distinct.update(torch.unique(yv).tolist())
        if integral and len(distinct) <= _DISTINCT_CAP:
            counts.update(yv.long().tolist())
        for v in yv.tolist():  # reservoir sample (Vitter's algorithm R), deterministic seed
            seen += 1  # known targets so far, this one included: it replaces a kept one with p = size / seen
            if len(reservoir) < _RESERVOIR:
                reservoir.append(v)
            else:
                j = rng.randrange(seen)
                if j < _RESERVOIR:
                    reservoir[j] = v
    if n == 0:
        raise ValueError("profile_data: the data is empty")
    if inf_found:
        raise ValueError("profile_data: the features have infinite values; fix or drop them first")
    evidence: dict[str, str] = {"n_samples": f"{n:,} examples", "n_features": f"{n_features} features per example"}
    if nan_x or nan_y:
        evidence["missing"] = (f"{nan_x:,} missing (NaN) feature values and {nan_y:,} missing targets; the "
                               "facts describe the rest (impute or drop them before training)")
    n_distinct = len(distinct)
    facts: dict[str, Any] = {"n_samples": n, "n_features": n_features}
    if entries_x:
        facts["feature_sparsity"] = zeros_x / entries_x
        evidence["feature_sparsity"] = (f"{zeros_x / entries_x:.1%} of the {entries_x:,} known feature values "
                                        "are exactly zero")
    if task is None:
        if n_distinct == 2 and integral:
            task, why = "classification", "the target has exactly 2 distinct values: binary classification"
        elif n_distinct == 2:
            task, why = "regression", ("the target has exactly 2 distinct values, not integers: read as a quantity "
                                       "to predict (if they are two classes, encode them as 0 and 1, or pass "
                                       "task='classification' with integer labels)")
        elif integral and n_distinct <= max(20, int(math.sqrt(n))) and n_distinct < n:
            task, why = "classification", (f"the target takes {n_distinct} distinct integer values "
                                           f"(<= max(20, sqrt(n)) = {max(20, int(math.sqrt(n)))}): classes")
        else:
            many = f"more than {_DISTINCT_CAP:,}" if n_distinct > _DISTINCT_CAP else str(n_distinct)
            task, why = "regression", (f"the target has {many} distinct {'integer' if integral else 'real'} "
                                       "values: a quantity to predict")
    else:
        why = "given by the caller"
    facts["task"] = task
    evidence["task"] = f"{task}: {why}"
    class_labels = None
    if task == "classification":
        if not integral or n_distinct > _DISTINCT_CAP:
            raise ValueError("profile_data: task='classification' needs integer class labels in the target" + (
                "" if integral else " (it has non-integer values: encode the classes as 0, 1, ...)"))
        labels = sorted(counts)
        class_counts = [counts[c] for c in labels]  # class index i is the i-th smallest label
        if labels != list(range(len(labels))):
            class_labels = labels
            shown = ", ".join(f"{lab}->{i}" for i, lab in enumerate(labels[:6])) + (" ..." if len(labels) > 6 else "")
            evidence["class_labels"] = (f"the labels are not 0..{len(labels) - 1}: class index i is the i-th "
                                        f"smallest label ({shown}); counts, class weights and the model's outputs "
                                        "follow that order, so train on the indices "
                                        "(torch.searchsorted(torch.tensor(profile.class_labels), y))")
        if len(class_counts) >= 2:
            facts["class_counts"] = class_counts
            nonzero = [c for c in class_counts if c > 0]
            ratio = max(nonzero) / min(nonzero)
            evidence["class_counts"] = (f"{len(class_counts)} classes, counts {class_counts[:10]}"
                                        f"{' ...' if len(class_counts) > 10 else ''}; largest/smallest = {ratio:.3g}")
    else:
        sample = sorted(reservoir)
        q1, med, q3 = (_quantile(sample, q) for q in (0.25, 0.5, 0.75))
        iqr = q3 - q1
        lo, hi = q1 - 3 * iqr, q3 + 3 * iqr
        outliers = sum(1 for v in sample if v < lo or v > hi) / len(sample)
        mad = _quantile(sorted(abs(v - med) for v in sample), 0.5)
        scale = 1.4826 * mad
        facts["target_outlier_fraction"] = outliers
        basis = "all targets" if n <= _RESERVOIR else f"a uniform sample of {_RESERVOIR:,} targets"
        evidence["target_outlier_fraction"] = (f"{outliers:.2%} of {basis} lie beyond 3 IQR of the quartiles "
                                               f"[{lo:.4g}, {hi:.4g}]")
        if scale > 0:
            facts["target_scale"] = scale
            evidence["target_scale"] = f"1.4826 x MAD = {scale:.4g} (median {med:.4g})"
    if model is not None:
        try:
            mprof = profile_model(model)
        except (TypeError, ValueError) as exc:
            raise type(exc)(str(exc).replace("profile_model:", "profile_data: model:", 1)) from None
        facts.update(mprof.facts)
        evidence.update(mprof.evidence)
    return DataProfile(facts=TaskProfile(**facts), evidence=evidence, nan_in_features=nan_x, nan_in_target=nan_y,
                       class_labels=class_labels)


def _quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    pos = q * (len(sorted_values) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)

