"""Built-in example tasks for ``advise trial --example`` and examples/: scikit-learn's bundled data sets
(no download), standardized and split 75/25 with a fixed seed, and a small MLP."""

from __future__ import annotations

from collections.abc import Callable

import torch


def example_task(name: str) -> tuple[Callable[[], torch.nn.Module], tuple, tuple]:
    """(model_fn, (X_train, y_train), (X_val, y_val)) for "digits" (10 classes) or "diabetes" (regression)."""
    try:
        from sklearn.datasets import load_diabetes, load_digits
    except ImportError as exc:
        raise ImportError("the examples use scikit-learn's bundled data: pip install scikit-learn") from exc
    if name == "digits":
        X, y = load_digits(return_X_y=True)
        X, y, out = torch.tensor(X, dtype=torch.float32), torch.tensor(y), 10
    elif name == "diabetes":
        X, y = load_diabetes(return_X_y=True)
        X, y, out = torch.tensor(X, dtype=torch.float32), torch.tensor(y, dtype=torch.float32), 1
        y = (y - y.mean()) / y.std()
    else:
        raise ValueError(f"unknown example {name!r}: digits or diabetes")
    X = (X - X.mean(0)) / (X.std(0) + 1e-6)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n = int(0.75 * len(y))
    tr, va = perm[:n], perm[n:]

    def model_fn() -> torch.nn.Module:
        net = torch.nn.Sequential(torch.nn.Linear(X.shape[1], 32), torch.nn.ReLU(), torch.nn.Linear(32, out))
        return net if out > 1 else torch.nn.Sequential(net, torch.nn.Flatten(0))
    return model_fn, (X[tr], y[tr]), (X[va], y[va])
