"""A smoke test, not a correctness test: CI runs the benchmark suite in --quick mode on every change so that it
never rots. It checks that every section is produced; it asserts nothing about speed (no timing assertions)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_report_quick(tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--rounds", "1", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (out / "report.md").read_text()
    for needle in ("| Adam |", "| RMSprop |", "training loop", "First step and a short real loop",
                   "| Adam, digits, 300 steps | cold |", "| Adam, digits, 300 steps | warm |", "cross_entropy",
                   "linear_cross_entropy", "hinge_loss"):
        assert needle in report, needle
    assert "error:" not in report
    results = json.loads((out / "results.json").read_text())["results"]
    assert {r["kind"] for r in results} == {"optimizer", "training_loop", "loss", "first_step", "first_call"}
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
