"""``python -m benchmarks advice``: does following the advice beat not asking?

The protocol (fixed; every row below is trained and judged by it):

- data: the 53 tables of ``benchmarks/tables.py`` (real tables bundled in installable packages, none from R's
  dataset collections, and generated families), each split 75/25 once (seed 0), features standardized with
  the training split's mean and std, regression targets too; the tables themselves split once into a fitting
  and a reporting half (``tables.split()``, recorded in ``benchmarks/advice_split.json``);
- model and training: an MLP n_features-64-64-outputs with ReLU, ``--steps`` (300) steps of batch ``--batch``
  (64), seeds 0, 1 and 2, the validation metric averaged over the seeds; the metric is the trial's default
  yardstick for the table: the error rate (balanced when the largest class is over 3x the smallest) or the MSE
  on standardized targets;
- the reference grid: {SGD momentum 0.9, Adam, AdamW, RMSprop} x {MSE, Huber | cross-entropy,
  multi-margin} x 7 learning rates 1e-4..1e-1 (half-decade steps); its best is the yardstick. Cached per
  budget and table in ``benchmarks/advice_grid[_STEPSxBATCH].json`` (``--regen-grid`` computes the tables it
  lacks, saving after each; ``--force`` recomputes);
- naive default: Adam, lr 1e-3, MSE / cross-entropy (what a user picks without us; a grid point);
- rules-only advice: ``advise`` on the table's profile plus ``budget_steps`` and ``batch_size``, as built
  (optimizer, loss and their hyperparameters): read off the grid when it is a grid point, else trained;
- trial advice: ``trial(model_fn, train, val, rec)`` with its defaults (nothing tuned per table) on seeds
  100-103, none of the judging seeds; its advice (optimizer, loss, lr, weight decay, and the number of steps
  to train) is trained again by the protocol on seeds 0/1/2 and judged the same way. Compute is counted in
  training steps (range tests, pruned runs and every seed included) against the grid's 50,400 (at 300 steps).

A table that fails to load (its package missing, a loader error, a constant target) is skipped with its reason
and counted ("Tables: N of M ran; K skipped"). Writes DIR/advice.md, DIR/advice.json and DIR/advice.png (with matplotlib).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch
from optadvisor.advisor._examples import MLP
from optadvisor.kernels import catalog

from .tables import TABLES, TableError, load_table, split

HERE = os.path.dirname(os.path.abspath(__file__))
BATCH, SEEDS = 64, (0, 1, 2)
STEPS = 300
BUDGETS = ((300, 64), (3000, 64), (300, 512), (3000, 512))
# the trial's own seeds: none of the judging seeds, so the judged value of its advice is not the one it selected on
TRIAL_SEEDS = tuple(range(100, 120))  # the first four by default (the search and three fresh); k + 1 with --cv-folds k
# the grid's candidates come from kernels' catalog: the optimizers searched by default (SGD with momentum 0.9,
# the usual setting) and every loss that can be trained without special targets; a cached grid computed over
# other candidates is recomputed (the cache records them)
_GRID_SETTINGS = {"SGD": {"momentum": 0.9}}
GRID_OPTIMIZERS = {e.name: dict(_GRID_SETTINGS.get(e.name, {})) for e in catalog.optimizers() if e.default_candidate}
GRID_LOSSES = {task: tuple(e.name for e in catalog.losses(task) if e.trial_note is None) for task in catalog.tasks()}
GRID_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
DATASETS = tuple(TABLES)
QUICK_DATASETS = ("iris", "diabetes_outliers")


def grid_path(steps: int, batch: int) -> str:
    return os.path.join(HERE, "advice_grid.json" if (steps, batch) == (300, 64) else f"advice_grid_{steps}x{batch}.json")


def protocol(steps: int, batch: int) -> dict[str, Any]:
    return {"steps": steps, "batch_size": batch, "seeds": list(SEEDS), "eval_every": max(1, steps // 10),
            "lrs": list(GRID_LRS), "optimizers": GRID_OPTIMIZERS, "losses": {k: list(v) for k, v in GRID_LOSSES.items()}}


@functools.lru_cache(maxsize=2)
def load(name: str) -> dict[str, Any]:
    """The table (see benchmarks/tables.py) and its yardstick: the trial's default metric for it."""
    from optadvisor.advisor._train import default_metric

    data = load_table(name)
    data["metric"] = default_metric(data["task"], _imbalance(data))
    return data


def _imbalance(data: dict[str, Any]) -> float | None:
    if data["task"] != "classification":
        return None
    counts = torch.bincount(data["train"][1])
    counts = counts[counts > 0]
    return float(counts.max() / counts.min())


def model_fn_for(data: dict[str, Any]):
    return lambda: MLP(data["n_features"], data["outputs"])


def protocol_run(data: dict[str, Any], optimizer: dict, loss: dict, lr: float, seed: int,
                 steps: int = STEPS, batch: int = BATCH) -> list[tuple[int, float]]:
    """One run of the protocol; its validation curve (the last point is the run's result)."""
    from optadvisor.advisor import Choice
    from optadvisor.advisor._train import train_run

    res = train_run(model_fn_for(data), seed, Choice(name=optimizer["name"], params=optimizer["params"], score=0),
                    Choice(name=loss["name"], params=loss["params"], score=0), lr, data["train"], data["val"],
                    steps, batch_size=batch, eval_every=max(1, steps // 10), metric=data["metric"])
    if res.diverged:
        return res.curve + [(res.steps, math.inf)]
    return res.curve


def _grid_job(args: tuple[str, str, str, float, int, int]) -> dict[str, Any]:
    torch.set_num_threads(1)
    name, opt, loss, lr, steps, batch = args
    data = load(name)
    params = dict(GRID_OPTIMIZERS[opt])
    curves = [[(s, round(v, 6) if math.isfinite(v) else v) for s, v in
               protocol_run(data, {"name": opt, "params": params}, {"name": loss, "params": {}}, lr, seed, steps, batch)]
              for seed in SEEDS]
    return {"optimizer": opt, "loss": loss, "lr": lr, "curves": curves}


def read_grid(steps: int, batch: int) -> dict[str, Any]:
    """The cached grid of one budget: {"protocol", "tables": {name: {"metric", "seconds", "runs"}}}; tables
    computed under another protocol are left out (recomputed by --regen-grid)."""
    path = grid_path(steps, batch)
    if not os.path.exists(path):
        return {"protocol": protocol(steps, batch), "tables": {}}
    with open(path) as fh:
        grid = json.load(fh)
    if "runs" in grid:  # the first format: one list of runs over the six examples
        tables: dict[str, Any] = {}
        for r in grid["runs"]:
            t = tables.setdefault(r["data"], {"metric": "val_mse" if r["data"].startswith("diabetes") else "val_error",
                                              "seconds": None, "runs": []})
            t["runs"].append({k: r[k] for k in ("optimizer", "loss", "lr", "curves")})
        grid = {"protocol": grid["protocol"], "torch": grid.get("torch"), "tables": tables}
    if grid["protocol"] != protocol(steps, batch):
        return {"protocol": protocol(steps, batch), "tables": {}}
    return grid


def regen_grid(names: tuple[str, ...], workers: int, steps: int, batch: int, force: bool = False) -> dict[str, Any]:
    """Compute the grid of the tables it lacks (all of ``names`` with ``force``), saving after each table."""
    grid = read_grid(steps, batch)
    todo = [n for n in names if force or n not in grid["tables"]]
    jobs = []
    for n in list(todo):
        try:
            data = load(n)
        except TableError as exc:
            print(f"grid: skipped {exc}", flush=True)
            todo.remove(n)
            continue
        jobs += [(n, o, lo, lr, steps, batch) for o in GRID_OPTIMIZERS for lo in GRID_LOSSES[data["task"]]
                 for lr in GRID_LRS]
    per_table = {n: len(GRID_OPTIMIZERS) * len(GRID_LOSSES[TABLES[n].task]) * len(GRID_LRS) for n in todo}
    done: dict[str, list] = {}
    t0 = {n: None for n in todo}
    start = time.time()
    with ProcessPoolExecutor(workers) as pool:
        for job, run in zip(jobs, pool.map(_grid_job, jobs, chunksize=2)):
            n = job[0]
            t0[n] = t0[n] or time.time()
            done.setdefault(n, []).append(run)
            if len(done[n]) == per_table[n]:
                grid["tables"][n] = {"metric": load(n)["metric"], "seconds": round(time.time() - t0[n], 1),
                                     "runs": done.pop(n)}
                grid["torch"] = torch.__version__
                _write_json(grid_path(steps, batch), grid)
                print(f"grid {steps}x{batch}: {n} done ({time.time() - start:.0f} s so far)", flush=True)
    return grid


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, separators=(",", ":"))
    os.replace(tmp, path)


def mean_curve(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    by_step: dict[int, list[float]] = {}
    for c in curves:
        for s, v in c:
            by_step.setdefault(int(s), []).append(float(v))
    return [(s, sum(v) / len(v) if len(v) == len(curves) else math.inf) for s, v in sorted(by_step.items())]


def grid_summary(grid: dict[str, Any], name: str) -> dict[str, Any] | None:
    """The grid's best, its early-stopped best, the naive default's value and every configuration's final value;
    None when the table is not in the grid."""
    entry = grid["tables"].get(name)
    if entry is None:
        return None
    runs = entry["runs"]
    final = {(r["optimizer"], r["loss"], r["lr"]): mean_curve(r["curves"])[-1][1] for r in runs}
    early = {(r["optimizer"], r["loss"], r["lr"]): min(v for _, v in mean_curve(r["curves"])) for r in runs}
    best = min(final, key=final.get)
    naive_loss = GRID_LOSSES[TABLES[name].task][0]
    steps = grid["protocol"]["steps"]
    return {"best": final[best], "best_config": best, "best_early_stopped": min(early.values()),
            "naive": final[("Adam", naive_loss, 1e-3)], "final": final, "metric": entry["metric"],
            "steps": len(runs) * len(SEEDS) * steps}


def judge(data: dict[str, Any], optimizer: dict, loss: dict, steps: int = STEPS, batch: int = BATCH) -> float:
    """The protocol's verdict on one piece of advice: mean over the seeds of the metric after ``steps``."""
    lr = float(optimizer["params"].get("lr", 1e-3))
    params = {k: v for k, v in optimizer["params"].items() if k != "lr"}
    vals = [protocol_run(data, {"name": optimizer["name"], "params": params}, loss, lr, s, steps, batch)[-1][1]
            for s in SEEDS]
    return sum(vals) / len(vals)


def _defaults(kind: str, name: str, task: str) -> dict[str, Any]:
    entries = catalog.optimizers() if kind == "optimizer" else catalog.losses(task)
    e = next(x for x in entries if x.name == name)
    return {k: getattr(v, "default", v) for k, v in e.params.items()}


def _norm(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def grid_point(g: dict[str, Any], task: str, optimizer: dict, loss: dict) -> float | None:
    """The grid's value of a piece of advice that *is* a grid point (same optimizer, loss, learning rate, every
    other hyperparameter at the grid's setting): no need to train it again. None otherwise."""
    lr = float(optimizer["params"].get("lr", 1e-3))
    key = (optimizer["name"], loss["name"], lr)
    if key not in g["final"] or optimizer["name"] not in GRID_OPTIMIZERS:
        return None
    want = {**_defaults("optimizer", optimizer["name"], task), **GRID_OPTIMIZERS[optimizer["name"]]}
    got = {**want, **optimizer["params"]}
    lwant = _defaults("loss", loss["name"], task)
    lgot = {**lwant, **loss["params"]}
    if any(_norm(got[k]) != _norm(want[k]) for k in got if k != "lr") or \
            any(_norm(lgot[k]) != _norm(lwant[k]) for k in lgot):
        return None
    return g["final"][key]


def rules_advice(data: dict[str, Any], steps: int = STEPS, batch: int = BATCH, **extra: Any):
    """The rules-only advice as a user gets it: the data's profile, plus the budget and batch size they train
    with (``extra``: ``advise``'s keyword arguments, e.g. ``extra_rules``)."""
    from optadvisor.advisor import advise, profile_data

    prof = profile_data(*data["train"], model=model_fn_for(data)())
    return advise({**prof.facts.known(), "batch_size": batch, "budget_steps": steps}, **extra)


def advise_for(data: dict[str, Any], g: dict[str, Any], trial_kwargs: dict[str, Any] | None, storage: str,
               steps: int, batch: int) -> dict[str, Any]:
    from optadvisor.advisor import trial

    rec = rules_advice(data, steps, batch)
    rules = {"optimizer": rec.optimizer.model_dump(), "loss": rec.loss.model_dump(),
             "fired": sorted({r.rule_id for r in rec.reasons})}
    cached = grid_point(g, data["task"], rules["optimizer"], rules["loss"])
    rules["value"] = cached if cached is not None else judge(data, rules["optimizer"], rules["loss"], steps, batch)
    rules["from_grid"] = cached is not None
    out: dict[str, Any] = {"rules": rules}
    if trial_kwargs is None:
        return out
    t0 = time.time()
    res = trial(model_fn_for(data), data["train"], data["val"], rec, storage=storage, progress=False,
                budget_steps=steps, batch_size=batch,
                seeds=TRIAL_SEEDS[:trial_kwargs.get("cv_folds", 3) + 1], **trial_kwargs)
    wall = time.time() - t0
    adv = res.recommendation
    n = adv.train_steps or steps
    out["trial"] = {"optimizer": adv.optimizer.model_dump(), "loss": adv.loss.model_dump(), "train_steps": n,
                    "value": judge(data, adv.optimizer.model_dump(), adv.loss.model_dump(), n, batch),
                    "trial_value": res.winner.mean, "origin": res.winner.origin, "verdict": res.verdict,
                    "finalists": [c.origin for c in res.ranked], "steps_run": res.steps_total,
                    "wall_s": round(wall, 2), "train_fraction": round(res.train_seconds / max(wall, 1e-9), 3),
                    "configs_tried": res.configs_tried, "pruned": res.pruned, "failed": len(res.failed)}
    return out


def _table_job(args: tuple[str, dict[str, Any], dict[str, Any] | None, int, int, str]) -> dict[str, Any]:
    """One table's row (or {"skipped": why}); runs in a worker process."""
    name, grid, trial_kwargs, steps, batch, tmp = args
    torch.set_num_threads(1)
    try:
        data = load(name)
    except TableError as exc:
        return {"skipped": str(exc)}
    g = grid_summary(grid, name)
    if g is None:
        return {"skipped": f"{name}: not in the cached grid for {steps}x{batch} (run with --regen-grid)"}
    adv = advise_for(data, g, trial_kwargs, os.path.join(tmp, f"{name}.db"), steps, batch)
    return {"data": name, "half": split()[name], "kind": data["kind"], "task": data["task"],
            "metric": g["metric"], "rows": len(data["train"][1]) + len(data["val"][1]),
            "grid_best": g["best"], "grid_best_config": list(g["best_config"]),
            "grid_best_early_stopped": g["best_early_stopped"], "naive": g["naive"],
            "grid_steps": g["steps"], **adv}


def run(names: tuple[str, ...], grid: dict[str, Any], trial_kwargs: dict[str, Any] | None, steps: int, batch: int,
        skipped: list[str], workers: int = 1) -> list[dict]:
    """Every table's row, in the order given (tables run ``workers`` at a time, one thread each)."""
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [(n, {"protocol": grid["protocol"], "tables": {n: grid["tables"][n]} if n in grid["tables"] else {}},
                 trial_kwargs, steps, batch, tmp) for n in names]
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                results = list(pool.map(_table_job, jobs))
        else:
            results = [_table_job(j) for j in jobs]
        for res in results:
            if "skipped" in res:
                skipped.append(res["skipped"])
                print(f"skipped: {res['skipped']}", flush=True)
                continue
            rows.append(res)
            print(_row_md(res), flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------------
# the verdicts: wins / ties / losses against the naive default, distance to the grid's best

def regression(row: dict) -> bool:
    return row["metric"] in ("val_mse", "val_mae")


def vs_naive(row: dict, value: float) -> str:
    """'better' / 'tie' / 'worse': worse means more than 2% (MSE) or +0.005 (error rate) behind the naive
    default, better the same margin ahead."""
    naive = row["naive"]
    if regression(row):
        return "worse" if value > 1.02 * naive else "better" if value < naive / 1.02 else "tie"
    return "worse" if value > naive + 0.005 else "better" if value < naive - 0.005 else "tie"


def near_best(row: dict, value: float, mse: float = 1.03, err: float = 0.005) -> bool:
    best = row["grid_best"]
    return value <= mse * best if regression(row) else value <= best + err


def ratio(row: dict, value: float) -> float:
    """value / naive for MSE; for error rates (value + 0.01) / (naive + 0.01), so that 0 vs 0.01 is not 0x."""
    if regression(row):
        return value / row["naive"]
    return (value + 0.01) / (row["naive"] + 0.01)


def summary(rows: list[dict], who: str) -> dict[str, Any]:
    vals = [r[who]["value"] for r in rows if who in r]
    rs = [r for r in rows if who in r]
    if not rs:
        return {}
    verdicts = [vs_naive(r, v) for r, v in zip(rs, vals)]
    logs = [math.log(ratio(r, v)) for r, v in zip(rs, vals) if math.isfinite(v)]
    return {"tables": len(rs), "better": verdicts.count("better"), "tie": verdicts.count("tie"),
            "worse": verdicts.count("worse"),
            "worst_ratio": max(ratio(r, v) for r, v in zip(rs, vals)),
            "geomean_ratio": math.exp(statistics.fmean(logs)) if logs else math.nan,
            "near_best_3pct": sum(near_best(r, v) for r, v in zip(rs, vals)),
            "near_best_10pct": sum(near_best(r, v, 1.10, 0.015) for r, v in zip(rs, vals)),
            "compute": (statistics.fmean(r["trial"]["steps_run"] / r["grid_steps"] for r in rs)
                        if who == "trial" else None),
            "compute_max": (max(r["trial"]["steps_run"] / r["grid_steps"] for r in rs) if who == "trial" else None)}


def summary_md(rows: list[dict], skipped: list[str], n_selected: int) -> list[str]:
    out = [f"Tables: {len(rows)} of {n_selected} ran" + (f"; {len(skipped)} skipped:" if skipped else "."),
           *[f"- skipped: {m}" for m in skipped], "",
           "| half | advice | tables | better than naive | tie (within 2% / 0.005) | worse | worst ratio to naive "
           "| geometric mean ratio to naive | within 3% / +0.005 of grid best | within 10% / +0.015 | compute / grid |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for half in ("fit", "report"):
        hr = [r for r in rows if r["half"] == half]
        for who in ("rules", "trial"):
            s = summary(hr, who)
            if not s:
                continue
            comp = f"{s['compute']:.1%} mean, {s['compute_max']:.1%} max" if s["compute"] is not None else "-"
            out.append(f"| {half} | {who} | {s['tables']} | {s['better']} | {s['tie']} | {s['worse']} | "
                       f"{s['worst_ratio']:.3f} | {s['geomean_ratio']:.3f} | {s['near_best_3pct']} | "
                       f"{s['near_best_10pct']} | {comp} |")
    out += ["", "Ratio to naive: metric / naive for MSE, (error + 0.01) / (naive error + 0.01) for error rates; "
            "below 1 is better than the naive default (Adam 1e-3 + MSE / cross-entropy)."]
    return out


def _verdict(row: dict, value: float) -> str:
    if regression(row):
        return f"{value:.4f} ({value / row['grid_best']:.3f}x)"
    return f"{value:.4f} ({value - row['grid_best']:+.4f})"


def _cfg(part: dict) -> str:
    o, lo = part["optimizer"], part["loss"]
    wd = o["params"].get("weight_decay")
    extra = f", wd {wd:.2g}" if o["name"] in ("AdamW", "SGD") and wd else ""
    return f"{o['name']} {o['params'].get('lr', 0):.2g}{extra} + {lo['name']}"


HEADER = ["| data | half | metric | grid best (config) | naive Adam 1e-3 | rules-only advice | trial advice "
          "| trial compute / grid |",
          "|---|---|---|---|---|---|---|---|"]


def _row_md(r: dict) -> str:
    o, lo, lr = r["grid_best_config"]
    t = r.get("trial")
    trial_cells = (f"{_verdict(r, t['value'])} {vs_naive(r, t['value'])}: {_cfg(t)}, {t['train_steps']} steps "
                   f"({t['origin']}) | {t['steps_run'] / r['grid_steps']:.1%}") if t else "- | -"
    return (f"| {r['data']} | {r['half']} | {r['metric']} | {r['grid_best']:.4f} ({o} {lr:g} + {lo}) | "
            f"{_verdict(r, r['naive'])} | {_verdict(r, r['rules']['value'])} {vs_naive(r, r['rules']['value'])}: "
            f"{_cfg(r['rules'])} | {trial_cells} |")


def chart(rows: list[dict], path: str) -> str:
    try:
        from optadvisor.advisor._lr import pyplot
        plt = pyplot()
    except ImportError:
        return "chart: skipped (pip install '.[plots]')"
    fig, axes = plt.subplots(2, 1, figsize=(12, 7))
    for ax, half in zip(axes, ("fit", "report")):
        hr = sorted((r for r in rows if r["half"] == half), key=lambda r: ratio(r, r["rules"]["value"]))
        xs = range(len(hr))
        series = [("grid best", lambda r: r["grid_best"]), ("rules-only", lambda r: r["rules"]["value"])]
        if hr and "trial" in hr[0]:
            series.append(("trial", lambda r: r["trial"]["value"]))
        for k, (label, get) in enumerate(series):
            ax.bar([x + (k - 1) * 0.27 for x in xs], [min(ratio(r, get(r)), 3.0) for r in hr], width=0.27, label=label)
        ax.axhline(1.0, color="black", linewidth=1)
        ax.set_yscale("log")
        ax.set_xticks(list(xs), [r["data"] for r in hr], rotation=60, fontsize=7, ha="right")
        ax.set_ylabel("ratio to naive (log)")
        ax.set_title(f"{half} half ({len(hr)} tables): below 1 beats Adam 1e-3 + MSE / cross-entropy", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"chart: {path}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks advice", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK_DATASETS)} (CI)")
    ap.add_argument("--datasets", nargs="+", metavar="TABLE", help="only these tables (see benchmarks/tables.py)")
    ap.add_argument("--half", choices=("fit", "report"), help="only the tables of one half")
    ap.add_argument("--steps", type=int, default=STEPS, help="the budget in steps (default %(default)s)")
    ap.add_argument("--batch", type=int, default=BATCH, help="the batch size (default %(default)s)")
    ap.add_argument("--no-trial", action="store_true", help="the rules-only advice only (minutes, not hours)")
    ap.add_argument("--cv-folds", type=int, help="the trial's cv_folds (k-fold cross-validation of the finalists)")
    ap.add_argument("--regen-grid", action="store_true",
                    help="compute the reference grid of the selected tables it lacks (saved after each table)")
    ap.add_argument("--force", action="store_true", help="with --regen-grid: recompute the selected tables too")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="processes for --regen-grid and for the tables (default: the CPU count)")
    ap.add_argument("--out", default="benchmark-report", help="directory for the report (default: %(default)s)")
    args = ap.parse_args(argv)
    if args.datasets:
        unknown = [n for n in args.datasets if n not in TABLES]
        if unknown:
            ap.error(f"unknown table(s) {', '.join(unknown)}; the tables: {', '.join(TABLES)}")
    if args.steps < 10 or args.batch < 1:
        ap.error("--steps must be >= 10 and --batch >= 1")
    names = tuple(args.datasets or (QUICK_DATASETS if args.quick else DATASETS))
    if args.half:
        halves = split()
        names = tuple(n for n in names if halves[n] == args.half)
    if args.regen_grid:
        regen_grid(names, args.workers, args.steps, args.batch, args.force)
    grid = read_grid(args.steps, args.batch)
    if not grid["tables"]:
        print(f"benchmarks advice: no cached grid at {grid_path(args.steps, args.batch)}; run with --regen-grid",
              file=sys.stderr)
        return 2
    header = [f"Machine: {platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}. Command: "
              f"python -m benchmarks advice {' '.join(sys.argv[2:] if argv is None else argv)}".rstrip(), "",
              f"Budget: {args.steps} steps of batch {args.batch}. Validation metric, mean over seeds 0/1/2 (error "
              "rate, balanced when the largest class is over 3x the smallest; MSE on standardized targets); "
              "in brackets: x the grid's best (regression) or the difference (classification); then better / tie / "
              "worse than the naive default (2% / 0.005). The trial searched on seeds 100-103, none of the judging "
              "seeds. Protocol: benchmarks/advice.py; tables and halves: benchmarks/tables.py.", ""]
    print("\n".join(header + HEADER), flush=True)
    skipped: list[str] = []
    t0 = time.time()
    trial_kwargs = None if args.no_trial else {"cv_folds": args.cv_folds} if args.cv_folds else {}
    rows = run(names, grid, trial_kwargs, args.steps, args.batch, skipped,
               1 if args.quick else args.workers)
    summ = summary_md(rows, skipped, len(names))
    summ.append(f"Wall time: {time.time() - t0:.0f} s (grid cached).")
    print("\n".join([""] + summ), flush=True)
    os.makedirs(args.out, exist_ok=True)
    extra = chart(rows, os.path.join(args.out, "advice.png"))
    with open(os.path.join(args.out, "advice.json"), "w") as fh:
        json.dump({"torch": torch.__version__, "steps": args.steps, "batch": args.batch, "skipped": skipped,
                   "rows": rows}, fh, indent=1, default=float)
    with open(os.path.join(args.out, "advice.md"), "w") as fh:
        fh.write("\n".join(header + summ + [""] + HEADER + [_row_md(r) for r in rows]) + "\n")
    print(f"{extra}\nwritten: {os.path.join(args.out, 'advice.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
