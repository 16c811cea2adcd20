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
    # 607 s on a loaded 2-core machine, over 900 s beside another benchmark: a smoke test's generous limit
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--rounds", "1", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=1800)
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
                          timeout=1800)  # a smoke test: generous for a loaded machine
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


def test_families_quick_runs_every_recipe_on_a_workload(tmp_path):
    """``python -m benchmarks families --quick`` on the fine-tuning workload without the trial (the others and
    the trial take minutes): every recipe trained, the report and its JSON written."""
    from benchmarks import families

    assert families.main(["--quick", "--workloads", "finetune", "--no-trial", "--workers", "1",
                          "--out", str(tmp_path)]) == 0
    report = (tmp_path / "families.md").read_text()
    for needle in ("| finetune | naive |", "| finetune | advised |", "| finetune | grid best: Adam ",
                   "- finetune, advised: time to target <= 0.7:", "AdamW(betas=[0.9, 0.999], eps=1e-08, lr=0.0001"):
        assert needle in report, needle
    data = json.loads((tmp_path / "families.json").read_text())
    rows = data["summaries"]["finetune"]["rows"]
    assert set(rows) == {"naive", "advised", "Adam 0.001 cosine", "Adam 0.01 cosine"}
    assert rows["naive"]["time_to_target"] == 1.0  # the naive recipe reaches its own final value at the end


def test_families_time_to_target_and_the_verdicts():
    """The measures on synthetic curves: the first evaluated step at or under the target, a diverged seed
    counting as inf from where it stopped, the grid's best, and both targets at their bounds."""
    from benchmarks import families as f

    assert f.steps_to([(10, 3.0), (20, 2.0), (30, 2.0)], 2.0) == 20
    assert f.steps_to([(10, 3.0), (20, 2.5)], 2.0) is None
    runs = [{"curve": [(10, 2.0, 0.5), (20, 1.0, 0.25)]}, {"curve": [(10, 4.0, 0.5)]}]  # seed 2 diverged
    assert f.mean_curve(runs, 1) == [(10, 3.0), (20, float("inf"))]
    assert f.mean_curve(runs, 2) == [(10, 0.5), (20, float("inf"))]
    w = f.Workload("t", "", 40, 8, (0, 1), {}, None, None, None, None)

    def runs_of(*finals):
        return [{"curve": [(20, v + 1.0, 0.1), (40, v, 0.1)], "seconds": 1.0} for v in finals]

    summary = f.summarize(w, {"naive": runs_of(1.0, 1.0), "advised": runs_of(0.0, 0.2),
                              "Adam 0.001 constant": runs_of(0.1, 0.1), "Adam 0.01 cosine": runs_of(0.3, 0.3)})
    assert summary["target"] == 1.0 and summary["grid_best"] == "Adam 0.001 constant"
    advised = summary["rows"]["advised"]
    assert (advised["steps_to_target"], advised["time_to_target"]) == (40, 1.0)  # 1.1 at step 20: not yet
    assert f.verdicts(summary) == {"time_to_target_ok": False, "near_best_ok": True}  # 0.1 <= 1.02 x 0.1
    summary["rows"]["advised"]["time_to_target"] = 0.7
    summary["rows"]["advised"]["final_loss"] = 0.1021
    assert f.verdicts(summary) == {"time_to_target_ok": True, "near_best_ok": False}
