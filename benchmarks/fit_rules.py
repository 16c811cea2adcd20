"""``python -m benchmarks.fit_rules``: what the fitting half of the advice benchmark says about learning rates,
read off the cached grid (no training). This is how the learning-rate rules' constants were chosen; it never
reads the reporting half unless asked (``--half report``, to check a rule after the fact).

For each table: its facts (task, training rows, epochs = steps x batch / rows), the grid's best configuration,
and for Adam with the naive loss (MSE / cross-entropy) and with the rules' loss, each learning rate's value as a
ratio to Adam 1e-3 (regression: MSE ratio; classification: (error + 0.01) / (naive + 0.01)). Then, for each
candidate rule "Adam at lr L when epochs is in [lo, hi)", its record on the half: better / tie / worse than
Adam 1e-3 (2% / 0.005), the geometric-mean ratio and the worst.

    python -m benchmarks.fit_rules [--half fit|report] [--steps 300 --batch 64]
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from . import advice
from .tables import TABLES, split


def table_facts(grid: dict[str, Any], steps: int, batch: int, half: str) -> list[dict[str, Any]]:
    halves = split()
    out = []
    for name in grid["tables"]:
        if halves[name] != half:
            continue
        g = advice.grid_summary(grid, name)
        task = TABLES[name].task
        naive_loss = advice.GRID_LOSSES[task][0]
        data = advice.load(name)
        n = len(data["train"][1])
        row = {"name": name, "task": task, "rows": n, "epochs": steps * batch / n, "g": g, "metric": g["metric"]}
        row["adam"] = {lr: g["final"][("Adam", naive_loss, lr)] for lr in advice.GRID_LRS}
        out.append(row)
    return out


def _ratio(row: dict[str, Any], v: float) -> float:
    return advice.ratio({"metric": row["metric"], "naive": row["g"]["naive"]}, v)


def _verdict(row: dict[str, Any], v: float) -> str:
    return advice.vs_naive({"metric": row["metric"], "naive": row["g"]["naive"]}, v)


def rule_record(rows: list[dict[str, Any]], lr: float, lo: float, hi: float, task: str | None = None) -> str:
    hit = [r for r in rows if lo <= r["epochs"] < hi and (task is None or r["task"] == task)]
    if not hit:
        return "no table"
    vs = [_verdict(r, r["adam"][lr]) for r in hit]
    ratios = [_ratio(r, r["adam"][lr]) for r in hit]
    gm = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
    return (f"{len(hit)} tables: better {vs.count('better')}, tie {vs.count('tie')}, worse {vs.count('worse')}; "
            f"geometric mean {gm:.3f}, worst {max(ratios):.3f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.fit_rules", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--half", choices=("fit", "report"), default="fit")
    ap.add_argument("--steps", type=int, default=advice.STEPS)
    ap.add_argument("--batch", type=int, default=advice.BATCH)
    args = ap.parse_args(argv)
    grid = advice.read_grid(args.steps, args.batch)
    rows = sorted(table_facts(grid, args.steps, args.batch, args.half), key=lambda r: r["epochs"])
    lrs = advice.GRID_LRS
    print(f"{args.half} half, {args.steps} steps of batch {args.batch}: Adam with MSE / cross-entropy, each "
          "learning rate as a ratio to 1e-3 (below 1 is better)\n")
    print("| table | task | rows | epochs | grid best | " + " | ".join(f"{lr:g}" for lr in lrs) + " |")
    print("|---|---|---|---|---|" + "---|" * len(lrs))
    for r in rows:
        o, lo, lr = r["g"]["best_config"]
        cells = " | ".join(f"{_ratio(r, r['adam'][x]):.3f}" for x in lrs)
        print(f"| {r['name']} | {r['task'][:5]} | {r['rows']} | {r['epochs']:.1f} | {o} {lr:g} {lo} "
              f"({_ratio(r, r['g']['best']):.3f}) | {cells} |")
    print("\nCandidate rules (Adam at lr L for tables whose epochs fall in [lo, hi)):")
    for task in ("regression", "classification", None):
        for lo, hi in ((0, 1), (0, 3), (1, 10), (3, 30), (10, 1e9), (30, 1e9)):
            for lr in (3e-4, 3e-3, 1e-2):
                print(f"  {task or 'any':14s} epochs [{lo:g}, {hi:g}) lr {lr:g}: {rule_record(rows, lr, lo, hi, task)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
