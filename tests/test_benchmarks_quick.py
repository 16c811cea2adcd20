"""A smoke test, not a correctness test: CI runs the benchmark suite in --quick mode on every change so that it
never rots. It checks that every section is produced; it asserts nothing about speed (no timing assertions)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the benchmarks package runs from the repository root, not installed; appended, not first (see conftest.py):
# without it the in-process tests passed only when another test module had put the root on sys.path
sys.path.append(ROOT)


def test_benchmark_report_quick(tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--rounds", "1", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (out / "report.md").read_text()
    for needle in ("| Adam |", "| RMSprop |", "training loop", "First step and a short real loop",
                   "| Adam, digits, 300 steps | cold |", "| Adam, digits, 300 steps | warm |", "cross_entropy",
                   "linear_cross_entropy", "hinge_loss", "Peers (`python -m benchmarks peers`)",
                   "| one 100k tensor | ours AdamW | fp32 |", "| one 100k tensor | ours AdamW8bit | 8-bit |",
                   "| torch fused AdamW | "):
        assert needle in report, needle
    assert "error:" not in report
    results = json.loads((out / "results.json").read_text())["results"]
    assert {r["kind"] for r in results} == {"optimizer", "training_loop", "loss", "first_step", "first_call",
                                            "peer_speed", "peer_quality"}
    assert all(r["ratio"] > 0 for r in results if "ratio" in r)
    first = [r for r in results if r["kind"] == "first_step"]
    assert all(r[who][temp]["first"] > 0 for r in first for who in ("ours", "torch") for temp in ("cold", "warm"))
    bench = json.loads((out / "pytest-benchmark.json").read_text())
    assert len(bench["benchmarks"]) > 20


def test_quality_report_quick(tmp_path):
    """``python -m benchmarks quality --quick`` for two families: the memory table, the training rows and the
    curves are written (a smoke test: the numbers are the report's, nothing is asserted about them)."""
    out = tmp_path / "quality"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "quality", "--quick", "--rounds", "1", "--families",
                           "RMSprop", "bf16-weights", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (out / "quality.md").read_text()
    for needle in ("| RMSprop | 8-bit |", "| RMSprop | bf16 |", "| RMSprop | digits MLP |",
                   "| RMSprop | char transformer LM |", "bf16 weights + kahan_sum"):
        assert needle in report, needle
    curves = json.loads((out / "quality.json").read_text())["curves"]
    assert set(curves) == {"RMSprop: digits MLP", "RMSprop: char transformer LM", "bf16-weights: digits MLP"}


def test_separate_grads_comparison_runs(capsys):
    """Runs, and prints a row per optimizer with positive times (it measures speed; asserts no ratio)."""
    from benchmarks.separate_grads import main

    main(["--rounds", "1", "--tensors", "20"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| Adam", "| SGD"))]
    assert [r.split(" | ")[0] for r in rows] == ["| Adam", "| AdamW", "| SGD-momentum"]
    for row in rows:
        times = [float(c) for c in row.strip("| ").split(" | ")[1:5]]
        assert all(t > 0 for t in times), row


def _peers():
    from benchmarks import peers
    return peers


def test_peers_state_bytes_and_absent_packages(monkeypatch):
    import torch

    from optadvisor import kernels

    peers = _peers()
    p = [torch.nn.Parameter(torch.randn(100_000))]
    p[0].grad = torch.randn(100_000)
    for cls, expected in ((torch.optim.AdamW, 8.0), (kernels.AdamW8bit, 2.03)):
        opt = cls(p, lr=1e-3)
        opt.step()
        assert abs(peers.state_bytes(opt) / 100_000 - expected) < 0.01, cls  # step counters are a few bytes
    shared = torch.zeros(1000)
    opt.state[p[0]] = {"a": shared, "b": shared[:10], "c": [torch.zeros(5)]}  # one storage counted once
    assert peers.state_bytes(opt) == 4000 + 20
    monkeypatch.setitem(peers.CONTENDERS, "nobody's AdamW", (torch.optim.AdamW, "no_such_package_here", "fp32"))
    got, notes = peers.available()
    assert "nobody's AdamW" not in got and peers.REFERENCE in got and "ours AdamW8bit" in got
    assert [n for n in notes if n.startswith("nobody's AdamW: skipped (no_such_package_here does not import: "
                                             "ModuleNotFoundError")]


def test_peers_timed_step_hands_the_gradients_back():
    """heavyball sets p.grad = None after each step: a timed step that did not hand the gradients back would
    time an optimizer that does nothing."""
    import torch

    peers = _peers()

    class ClearsGrads(torch.optim.SGD):
        def step(self, closure=None):
            super().step(closure)
            for g in self.param_groups:
                for q in g["params"]:
                    q.grad = None

    opt, step = peers._prepared(lambda params, **kw: ClearsGrads(params, lr=kw["lr"]), [(10,), (3, 4)])
    before = [q.detach().clone() for q in opt.param_groups[0]["params"]]
    step()
    assert all(not torch.equal(a, q) for a, q in zip(before, opt.param_groups[0]["params"]))
