"""Every example in a catalog class's or function's docstring runs (doctest), with a small model and data."""

import doctest

import pytest
import torch

from optadvisor import kernels
from optadvisor.kernels import catalog

OBJECTS = [obj for e in (*catalog.optimizers(), *catalog.losses()) for obj in (e.cls, e.functional) if obj]


def _globs():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    lm_head = torch.nn.Linear(16, 50, bias=False)
    return {"torch": torch, "kernels": kernels, "model": model,
            "logits": torch.randn(8, 5, requires_grad=True), "classes": torch.randint(0, 5, (8,)),
            "pred": torch.randn(8, 1, requires_grad=True), "y": torch.randn(8, 1),
            "scores": torch.randn(8, requires_grad=True), "labels_pm1": torch.randint(0, 2, (8,)) * 2.0 - 1,
            "h": torch.randn(8, 16, requires_grad=True), "lm_head": lm_head, "tokens": torch.randint(0, 50, (8,))}


@pytest.mark.parametrize("obj", OBJECTS, ids=lambda o: o.__name__)
def test_docstring_examples_run(obj):
    tests = doctest.DocTestFinder(recurse=False).find(obj, obj.__name__, globs=_globs())
    examples = [t for t in tests if t.examples]
    assert examples, f"{obj.__name__} has no runnable example in its docstring"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for t in examples:
        runner.run(t)
    assert runner.failures == 0, f"{obj.__name__}: {runner.failures} example(s) failed"


@pytest.mark.parametrize("entry", catalog.optimizers(), ids=lambda e: e.name)
def test_optimizer_docstrings_state_math_and_references(entry):
    doc = entry.cls.__doc__
    assert ".. math::" in doc and "References:" in doc and "Example::" in doc, entry.name
