"""Built-in example tasks for ``advise trial --example``, examples/ and the advice benchmark: scikit-learn's
bundled tables (no download), split and standardized as the advice benchmark's protocol says, and its MLP.

- digits, breast_cancer, wine, iris: classification; diabetes: regression; diabetes_outliers: diabetes with
  10% outliers planted in the *training* targets (a random sign times 8-16 standard deviations), the
  validation targets clean.
- A fixed 75/25 split (seed 0); features standardized with the training split's mean and std, regression
  targets too.
- The model: an MLP n_features-64-64-outputs with ReLU (one output, returned flat, for regression).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

EXAMPLES = ("digits", "breast_cancer", "wine", "iris", "diabetes", "diabetes_outliers")


class MLP(torch.nn.Module):
    """n_features-64-64-outputs, ReLU; a single output per example is returned flat (regression)."""

    def __init__(self, n_features: int, outputs: int, hidden: int = 64):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(n_features, hidden), torch.nn.ReLU(),
                                       torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
                                       torch.nn.Linear(hidden, outputs))
        self.flat = outputs == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return out.squeeze(-1) if self.flat else out


def load_example(name: str) -> dict[str, Any]:
    """The data set as a dict: name, task, train=(X, y), val=(X, y), n_features, outputs."""
    try:
        from sklearn import datasets
    except ImportError as exc:
        raise ImportError("the examples use scikit-learn's bundled data: pip install scikit-learn") from exc
    loaders = {"digits": datasets.load_digits, "breast_cancer": datasets.load_breast_cancer,
               "wine": datasets.load_wine, "iris": datasets.load_iris, "diabetes": datasets.load_diabetes,
               "diabetes_outliers": datasets.load_diabetes}
    if name not in loaders:
        raise ValueError(f"unknown example {name!r}: one of {', '.join(EXAMPLES)}")
    X, y = loaders[name](return_X_y=True)
    task = "regression" if name.startswith("diabetes") else "classification"
    data = split_table(torch.tensor(X, dtype=torch.float32), torch.tensor(y, dtype=torch.float64), task, name=name)
    gen = data.pop("generator")
    if name == "diabetes_outliers":
        # the split's generator, drawn on: the planted outliers are the ones the cached grid saw
        ytr = data["train"][1]
        k = len(ytr) // 10
        idx = torch.randperm(len(ytr), generator=gen)[:k]
        sign = torch.randint(0, 2, (k,), generator=gen) * 2 - 1
        ytr[idx] += sign * (8 + 8 * torch.rand(k, generator=gen))
    return data


def split_table(X: torch.Tensor, y: torch.Tensor, task: str, name: str = "data",
                val_fraction: float = 0.25) -> dict[str, Any]:
    """The examples' protocol on any table: a fixed split (seed 0; ``val_fraction`` to validation), features
    standardized with the training split's mean and std, regression targets too, class labels as indices
    (the i-th smallest label is class i). Rows with a missing (NaN) value are dropped first."""
    X, y = X.to(torch.float32), y.to(torch.float64)
    keep = ~(torch.isnan(X).any(1) | torch.isnan(y))
    X, y = X[keep], y[keep]
    if len(y) < 8:
        raise ValueError(f"{name}: {len(y)} complete rows; a trial needs at least 8")
    if task == "classification":
        labels = torch.unique(y)
        y = torch.searchsorted(labels, y).to(torch.int64)
    else:
        y = y.to(torch.float32)
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=gen)
    n = int((1 - val_fraction) * len(y))
    if not 0 < n < len(y):
        raise ValueError(f"{name}: val_fraction {val_fraction} leaves no training or no validation rows")
    tr, va = perm[:n], perm[n:]
    mu, sd = X[tr].mean(0), X[tr].std(0)
    sd[~(sd > 0)] = 1.0
    X = (X - mu) / sd
    ytr, yva = y[tr].clone(), y[va].clone()
    if task == "regression":
        m, s = ytr.mean(), ytr.std()
        s = s if s > 0 else torch.tensor(1.0)
        ytr, yva = (ytr - m) / s, (yva - m) / s
    outputs = 1 if task == "regression" else int(y.max()) + 1
    return {"name": name, "task": task, "train": (X[tr], ytr), "val": (X[va], yva), "n_features": X.shape[1],
            "outputs": outputs, "rows_dropped": int((~keep).sum()), "generator": gen}


def example_task(name: str) -> tuple[Callable[[], torch.nn.Module], tuple, tuple]:
    """(model_fn, (X_train, y_train), (X_val, y_val)) of a built-in example (see ``EXAMPLES``)."""
    data = load_example(name)
    return (lambda: MLP(data["n_features"], data["outputs"])), data["train"], data["val"]
