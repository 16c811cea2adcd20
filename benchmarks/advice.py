"""``python -m benchmarks advice``: does following the advice beat not asking?

The protocol (fixed; every row below is trained and judged by it):

- data and model: the built-in examples (``advisor/_examples.py``): scikit-learn's bundled tables (no
  download) digits, breast cancer, wine, iris (classification), diabetes (regression), and diabetes with
  10% outliers planted in the *training* targets (a random sign times 8-16 standard deviations; the
  validation targets stay clean); a fixed 75/25 split (seed 0), features standardized with the training
  split's mean and std, regression targets too; an MLP n_features-64-64-outputs with ReLU;
- training: 300 steps of batch 64, seeds 0, 1 and 2, validation
  metric averaged over the seeds; the metric: validation error rate (classification) or validation MSE on
  standardized targets (regression) — the trial's default yardsticks;
- the reference grid: {SGD momentum 0.9, Adam, AdamW, RMSprop} x {MSE, Huber | cross-entropy,
  multi-margin} x 7 learning rates 1e-4..1e-1 (half-decade steps), each at 300 steps; its best is the
  yardstick. It is cached in ``benchmarks/advice_grid.json`` (``--regen-grid`` recomputes it: ~10 minutes on
  2 cores);
- naive default: Adam, lr 1e-3, MSE / cross-entropy (what a user picks without us; a grid point);
- rules-only advice: ``advise(profile_data(X_train, y_train, model=net))`` as built (optimizer, loss and
  their hyperparameters), trained by the protocol;
- trial advice: ``trial(model_fn, train, val, rec)`` with its defaults (nothing tuned per data set); its
  advice (optimizer, loss, lr, weight decay, and the number of steps to train: early stopping) is trained
  again by the protocol on the same seeds and judged the same way. Compute is counted in training steps
  (range tests, pruned runs and every seed included) against the grid's 50,400.

Writes DIR/advice.md, DIR/advice.json and DIR/advice.png (with matplotlib).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch

from optadvisor.advisor._examples import EXAMPLES, MLP, load_example
from optadvisor.kernels import catalog

HERE = os.path.dirname(os.path.abspath(__file__))
GRID_PATH = os.path.join(HERE, "advice_grid.json")
STEPS, BATCH, SEEDS, EVAL_EVERY = 300, 64, (0, 1, 2), 30
# the grid's candidates come from kernels' catalog: the optimizers searched by default (SGD with momentum 0.9,
# the usual setting) and every loss that can be trained without special targets; a cached grid computed over
# other candidates is recomputed (the cache records them)
_GRID_SETTINGS = {"SGD": {"momentum": 0.9}}
GRID_OPTIMIZERS = {e.name: dict(_GRID_SETTINGS.get(e.name, {})) for e in catalog.optimizers() if e.default_candidate}
GRID_LOSSES = {task: tuple(e.name for e in catalog.losses(task) if e.trial_note is None) for task in catalog.tasks()}
GRID_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
DATASETS = EXAMPLES
QUICK_DATASETS = ("iris", "diabetes_outliers")


def load(name: str) -> dict[str, Any]:
    return load_example(name)


def model_fn_for(data: dict[str, Any]):
    return lambda: MLP(data["n_features"], data["outputs"])


def metric_for(task: str) -> str:
    return "val_mse" if task == "regression" else "val_error"


def protocol_run(data: dict[str, Any], optimizer: dict, loss: dict, lr: float, seed: int,
                 steps: int = STEPS) -> list[tuple[int, float]]:
    """One run of the protocol; its validation curve (the last point is the run's result)."""
    from optadvisor.advisor import Choice
    from optadvisor.advisor._train import train_run

    res = train_run(model_fn_for(data), seed, Choice(name=optimizer["name"], params=optimizer["params"], score=0),
                    Choice(name=loss["name"], params=loss["params"], score=0), lr, data["train"], data["val"],
                    steps, batch_size=BATCH, eval_every=EVAL_EVERY, metric=metric_for(data["task"]))
    if res.diverged:
        return res.curve + [(res.steps, math.inf)]
    return res.curve


def _grid_job(args: tuple[str, str, str, float]) -> dict[str, Any]:
    torch.set_num_threads(1)
    name, opt, loss, lr = args
    data = load(name)
    params = dict(GRID_OPTIMIZERS[opt])
    curves = [protocol_run(data, {"name": opt, "params": params}, {"name": loss, "params": {}}, lr, s)
              for s in SEEDS]
    return {"data": name, "optimizer": opt, "loss": loss, "lr": lr, "curves": curves}


def regen_grid(names: tuple[str, ...], workers: int) -> dict[str, Any]:
    jobs = [(n, o, lo, lr) for n in names for o in GRID_OPTIMIZERS
            for lo in GRID_LOSSES["regression" if n.startswith("diabetes") else "classification"] for lr in GRID_LRS]
    t0 = time.time()
    with ProcessPoolExecutor(workers) as pool:
        runs = list(pool.map(_grid_job, jobs, chunksize=4))
    return {"protocol": {"steps": STEPS, "batch_size": BATCH, "seeds": list(SEEDS), "eval_every": EVAL_EVERY,
                         "lrs": list(GRID_LRS), "optimizers": GRID_OPTIMIZERS, "losses": GRID_LOSSES},
            "torch": torch.__version__, "seconds": round(time.time() - t0, 1), "runs": runs}


def mean_curve(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    by_step: dict[int, list[float]] = {}
    for c in curves:
        for s, v in c:
            by_step.setdefault(int(s), []).append(float(v))
    return [(s, sum(v) / len(v) if len(v) == len(curves) else math.inf) for s, v in sorted(by_step.items())]


def grid_summary(grid: dict[str, Any], name: str) -> dict[str, Any]:
    runs = [r for r in grid["runs"] if r["data"] == name]
    if not runs:
        raise SystemExit(f"benchmarks advice: {name!r} is not in {GRID_PATH}; run with --regen-grid")
    final = {(r["optimizer"], r["loss"], r["lr"]): mean_curve(r["curves"])[-1][1] for r in runs}
    early = {(r["optimizer"], r["loss"], r["lr"]): min(v for _, v in mean_curve(r["curves"])) for r in runs}
    best = min(final, key=final.get)
    naive_loss = GRID_LOSSES["regression" if name.startswith("diabetes") else "classification"][0]
    return {"best": final[best], "best_config": best, "best_early_stopped": min(early.values()),
            "naive": final[("Adam", naive_loss, 1e-3)], "final": final,
            "steps": len(runs) * len(SEEDS) * STEPS}


def judge(data: dict[str, Any], optimizer: dict, loss: dict, steps: int = STEPS) -> float:
    """The protocol's verdict on one piece of advice: mean over the seeds of the metric after ``steps``."""
    lr = float(optimizer["params"].get("lr", 1e-3))
    params = {k: v for k, v in optimizer["params"].items() if k != "lr"}
    vals = [protocol_run(data, {"name": optimizer["name"], "params": params}, loss, lr, s, steps)[-1][1]
            for s in SEEDS]
    return sum(vals) / len(vals)


def advise_for(data: dict[str, Any], trial_kwargs: dict[str, Any], storage: str) -> dict[str, Any]:
    from optadvisor.advisor import advise, profile_data, trial

    model_fn = model_fn_for(data)
    rec = advise(profile_data(*data["train"], model=model_fn()))
    rules = {"optimizer": rec.optimizer.model_dump(), "loss": rec.loss.model_dump()}
    rules["value"] = judge(data, rules["optimizer"], rules["loss"])
    t0 = time.time()
    res = trial(model_fn, data["train"], data["val"], rec, storage=storage, progress=False, **trial_kwargs)
    wall = time.time() - t0
    adv = res.recommendation
    steps = adv.train_steps or STEPS
    out = {"rules": rules,
           "trial": {"optimizer": adv.optimizer.model_dump(), "loss": adv.loss.model_dump(), "train_steps": steps,
                     "value": judge(data, adv.optimizer.model_dump(), adv.loss.model_dump(), steps),
                     "trial_value": res.winner.mean, "steps_run": res.steps_total, "wall_s": round(wall, 2),
                     "train_fraction": round(res.train_seconds / max(wall, 1e-9), 3),
                     "configs_tried": res.configs_tried, "pruned": res.pruned, "failed": len(res.failed)}}
    return out


def run(names: tuple[str, ...], grid: dict[str, Any], trial_kwargs: dict[str, Any], out_dir: str) -> list[dict]:
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            torch.set_num_threads(1)
            data = load(name)
            g = grid_summary(grid, name)
            adv = advise_for(data, trial_kwargs, os.path.join(tmp, f"{name}.db"))
            row = {"data": name, "task": data["task"], "metric": metric_for(data["task"]),
                   "grid_best": g["best"], "grid_best_config": list(g["best_config"]),
                   "grid_best_early_stopped": g["best_early_stopped"], "naive": g["naive"],
                   "grid_steps": g["steps"], **adv}
            rows.append(row)
            print(_row_md(row), flush=True)
    return rows


def _verdict(row: dict, value: float) -> str:
    if row["task"] == "regression":
        return f"{value:.4f} ({value / row['grid_best']:.3f}x)"
    return f"{value:.4f} ({value - row['grid_best']:+.4f})"


def _cfg(part: dict) -> str:
    o, lo = part["optimizer"], part["loss"]
    wd = o["params"].get("weight_decay")
    extra = f", wd {wd:.2g}" if o["name"] in ("AdamW", "SGD") and wd else ""
    return f"{o['name']} {o['params'].get('lr', 0):.2g}{extra} + {lo['name']}"


HEADER = ["| data | metric | grid best (config) | grid best, early-stopped | naive Adam 1e-3 | rules-only advice "
          "| trial advice | trial compute / grid | trial: training share of wall time |",
          "|---|---|---|---|---|---|---|---|---|"]


def _row_md(r: dict) -> str:
    o, lo, lr = r["grid_best_config"]
    t = r["trial"]
    return (f"| {r['data']} | {r['metric']} | {r['grid_best']:.4f} ({o} {lr:g} + {lo}) | "
            f"{r['grid_best_early_stopped']:.4f} | {_verdict(r, r['naive'])} | {_verdict(r, r['rules']['value'])}: "
            f"{_cfg(r['rules'])} | {_verdict(r, t['value'])}: {_cfg(t)}, {t['train_steps']} steps | "
            f"{t['steps_run'] / r['grid_steps']:.1%} ({t['steps_run']:,} steps) | {t['train_fraction']:.0%} |")


def chart(rows: list[dict], path: str) -> str:
    try:
        from optadvisor.advisor._lr import pyplot
        plt = pyplot()
    except ImportError:
        return "chart: skipped (pip install '.[plots]')"
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 1]})
    names = [r["data"] for r in rows]
    xs = range(len(rows))

    def rel(r, v):
        return v / r["grid_best"] if r["task"] == "regression" else 1 + (v - r["grid_best"]) / max(r["grid_best"], 0.01)
    for k, (label, get) in enumerate((("naive Adam 1e-3", lambda r: r["naive"]),
                                      ("rules-only", lambda r: r["rules"]["value"]),
                                      ("trial", lambda r: r["trial"]["value"]))):
        ax.bar([x + (k - 1) * 0.27 for x in xs], [min(rel(r, get(r)), 3.0) for r in rows], width=0.27, label=label)
    ax.axhline(1.0, color="black", linewidth=1)
    ax.set_xticks(list(xs), names, rotation=20, fontsize=8)
    ax.set_ylabel("metric / grid best (error: 1 + gap / max(best, 0.01); capped at 3)")
    ax.legend(fontsize=8)
    bx.bar(list(xs), [r["trial"]["steps_run"] / r["grid_steps"] for r in rows])
    bx.set_xticks(list(xs), names, rotation=20, fontsize=8)
    bx.set_ylabel("trial compute / grid compute")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"chart: {path}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks advice", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK_DATASETS)} (CI)")
    ap.add_argument("--datasets", nargs="+", choices=DATASETS, help="only these data sets")
    ap.add_argument("--regen-grid", action="store_true", help=f"recompute the reference grid into {GRID_PATH}")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes for --regen-grid")
    ap.add_argument("--out", default="benchmark-report", help="directory for the report (default: %(default)s)")
    args = ap.parse_args(argv)
    names = tuple(args.datasets or (QUICK_DATASETS if args.quick else DATASETS))
    if args.regen_grid:
        grid = regen_grid(DATASETS, args.workers)
        with open(GRID_PATH, "w") as fh:
            json.dump(grid, fh)
        print(f"grid: {len(grid['runs'])} configurations in {grid['seconds']} s -> {GRID_PATH}", flush=True)
    if not os.path.exists(GRID_PATH):
        print(f"benchmarks advice: no cached grid at {GRID_PATH}; run with --regen-grid", file=sys.stderr)
        return 2
    with open(GRID_PATH) as fh:
        grid = json.load(fh)
    header = [f"Machine: {platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}. Command: "
              f"python -m benchmarks advice {' '.join(sys.argv[2:] if argv is None else argv)}".rstrip(), "",
              "Validation metric, mean over seeds 0/1/2 (error rate: lower is better; MSE on standardized targets); "
              "in brackets: x the grid's best (regression) or the difference (classification). Protocol: "
              "benchmarks/advice.py.", ""]
    print("\n".join(header + HEADER), flush=True)
    rows = run(names, grid, {}, args.out)
    os.makedirs(args.out, exist_ok=True)
    extra = chart(rows, os.path.join(args.out, "advice.png"))
    with open(os.path.join(args.out, "advice.json"), "w") as fh:
        json.dump({"torch": torch.__version__, "rows": rows}, fh, indent=2, default=float)
    with open(os.path.join(args.out, "advice.md"), "w") as fh:
        fh.write("\n".join(header + HEADER + [_row_md(r) for r in rows]) + "\n")
    print(f"{extra}\nwritten: {os.path.join(args.out, 'advice.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
