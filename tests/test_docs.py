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


# ---- the README's figures are the reports' (python -m benchmarks readme) ------------------------------------
def _readme_module():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "readme.py"
    spec = importlib.util.spec_from_file_location("benchmarks_readme_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readmes_tables_are_the_reports_tables():
    readme = _readme_module()
    text = (readme.ROOT / "README.md").read_text()
    blocks = text.count("<!-- generated: ")
    assert blocks >= 12, "the README's measured tables are generated blocks"
    assert readme.render(text) == text, "README.md drifted from benchmarks/latest/: run python -m benchmarks readme"


def test_the_readmes_chart_was_drawn_from_the_results_beside_it():
    readme = _readme_module()
    assert readme.chart_source() == readme.results_hash(), (
        "benchmarks/latest/ratios.png was not drawn from results.json: run python -m benchmarks readme")


def test_generated_blocks_refuse_what_they_cannot_find(tmp_path):
    readme = _readme_module()
    (tmp_path / "r.md").write_text("Machine: here\n\n| a | b |\n|---|---|\n| x | 1 |\n| y | 2 |\n\ntext\n")
    ok = "<!-- generated: r.md | | a | b | -->\nold\n<!-- /generated -->\n"
    assert readme.render(ok, tmp_path) == "<!-- generated: r.md | | a | b | -->\n| a | b |\n|---|---|\n| x | 1 |\n" \
                                         "| y | 2 |\n<!-- /generated -->\n"
    rows = '<!-- generated: r.md | | a | rows "| y |" + machine -->\n<!-- /generated -->'
    assert readme.render(rows, tmp_path) == ('<!-- generated: r.md | | a | rows "| y |" + machine -->\nMachine: here\n\n'
                                             "| a | b |\n|---|---|\n| y | 2 |\n<!-- /generated -->")
    with pytest.raises(readme.DocError, match=r"README.md line 1: a generated block without its closing"):
        readme.render("<!-- generated: r.md | | a | -->\n| a |\n", tmp_path)
    with pytest.raises(readme.DocError, match=r"line 1: missing.md does not exist"):
        readme.render("<!-- generated: missing.md | | a | -->\n<!-- /generated -->", tmp_path)
    with pytest.raises(readme.DocError, match=r"line 1 \(r.md\): no table whose header starts with '\| c \|'"):
        readme.render("<!-- generated: r.md | | c | -->\n<!-- /generated -->", tmp_path)
    with pytest.raises(readme.DocError, match=r"no row of the r.md table contains '\| z \|'"):
        readme.render('<!-- generated: r.md | | a | rows "| z |" -->\n<!-- /generated -->', tmp_path)
