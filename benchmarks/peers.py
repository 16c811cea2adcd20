"""``python -m benchmarks peers``: our AdamW and AdamW8bit beside the optimizers a user would pick instead.

The peers (extra ``peers``: ``pip install '.[peers]'``; each one absent is skipped with a note, never dropped
from the table silently): torch's fused AdamW (the reference of every ratio), heavyball's ``AdamW``,
bitsandbytes' ``AdamW8bit`` (its CPU backend here), torchao's ``AdamW8bit``; ours: ``kernels.AdamW`` and
``kernels.AdamW8bit``. Every one at lr 1e-3, weight decay 1e-2, betas (0.9, 0.999), eps 1e-8.

- **Step time**: median of interleaved rounds in one process, every optimizer over the same shapes with
  gradients in tensors of their own (as after torch's default ``zero_grad(set_to_none=True)``), after two
  warm-up steps (compiles done: ours through ``kernels.warmup(opt)``, which by default would compile in the
  background while its first steps run eager); ratio to torch's fused AdamW in the same rounds.
- **State bytes per parameter**, counted from the tensors each optimizer keeps in ``optimizer.state``
  (tensor subclasses such as torchao's 8-bit state are read through ``__tensor_flatten__``: codes and
  scales; shared tensors counted once).
- **Quality**: the final validation loss of the digits MLP of ``python -m benchmarks quality`` (64-256-256-10,
  600 steps of batch 64, seeds 0/1/2; lr 1e-3, weight decay 1e-2) — a fast optimizer that trains worse is
  not faster.

Writes DIR/peers.md, DIR/peers.json and (with matplotlib) DIR/peers.png.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import math
import os
import platform
import sys
from collections.abc import Callable

import torch

from optadvisor import kernels
from optadvisor.kernels._runtime.optimizer import FusedOptimizer

from .cases import interleaved, resnet50_shapes

LR, WD = 1e-3, 1e-2
# the same algorithm for every contender (heavyball's own defaults are betas (0.9, 0.99))
SAME = {"betas": (0.9, 0.999), "eps": 1e-8}
REFERENCE = "torch fused AdamW"


def _peer(module: str, attr: str) -> Callable[..., torch.optim.Optimizer]:
    """A peer's optimizer class, imported when first needed; ImportError when its package is absent."""
    def build(params, **kw):
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj(params, **kw)
    return build


# label -> (factory taking (params, lr=, weight_decay=), package it needs or None, state precision)
CONTENDERS: dict[str, tuple[Callable[..., torch.optim.Optimizer], str | None, str]] = {
    REFERENCE: (functools.partial(torch.optim.AdamW, fused=True), None, "fp32"),
    "ours AdamW": (kernels.AdamW, None, "fp32"),
    "heavyball AdamW": (_peer("heavyball", "AdamW"), "heavyball", "fp32"),
    "bitsandbytes AdamW8bit (CPU)": (_peer("bitsandbytes.optim", "AdamW8bit"), "bitsandbytes", "8-bit"),
    "torchao AdamW8bit": (_peer("torchao.optim", "AdamW8bit"), "torchao", "8-bit"),
    "ours AdamW8bit": (kernels.AdamW8bit, None, "8-bit"),
}


def available(names: list[str] | None = None) -> tuple[dict[str, Callable], list[str]]:
    """The contenders whose packages import, and a note for each that does not."""
    out, notes = {}, []
    for label, (factory, package, _) in CONTENDERS.items():
        if names and label not in names:
            continue
        if package is not None:
            try:
                importlib.import_module(package)
            except Exception as exc:  # noqa: BLE001 - a peer's import can fail in many ways; say how
                notes.append(f"{label}: skipped ({package} does not import: {type(exc).__name__}: {exc}; "
                             "pip install '.[peers]')")
                continue
        out[label] = factory
    return out, notes


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``opt.state``, through tensor subclasses, each storage counted once."""
    seen: dict[tuple[int, int], int] = {}

    def walk(x) -> None:
        if isinstance(x, torch.Tensor):
            if type(x) is not torch.Tensor and hasattr(x, "__tensor_flatten__"):
                inner, _ = x.__tensor_flatten__()
                for name in inner:
                    walk(getattr(x, name))
                return
            storage = x.untyped_storage()
            seen[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(list(opt.state.values()))
    return sum(seen.values())


def _prepared(factory: Callable, shapes: list[tuple[int, ...]]) -> tuple[torch.optim.Optimizer, Callable]:
    """The optimizer after two warm-up steps, and its timed step: the gradients are handed back before each
    step (heavyball sets ``p.grad = None`` after stepping: without them its later steps would do nothing)."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.1) for s in shapes]
    grads = [torch.randn(p.shape, generator=gen) * 0.01 for p in params]
    opt = factory(params, lr=LR, weight_decay=WD, **SAME)
    if isinstance(opt, FusedOptimizer):
        # compiled before timing, as in any run long enough to matter: by default our first steps run eager
        # while a background thread compiles (the first-step section measures that start)
        kernels.warmup(opt)

    def step():
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
    step()  # state allocated, compiles done
    step()
    return opt, step


def speed_rows(quick: bool, rounds: int, contenders: dict[str, Callable], results: list[dict]) -> list[str]:
    shapes = ({"one 100k tensor": [(100_000,)], "50 x 1k tensors": [(1000,)] * 50} if quick else
              {"one 10M tensor": [(10_000_000,)], "ResNet-50 shapes": resnet50_shapes()})
    rows = ["| workload | optimizer | state | ms per step | ratio to torch fused AdamW | state bytes / param |",
            "|---|---|---|---|---|---|"]
    for wl, shp in shapes.items():
        n = sum(torch.Size(s).numel() for s in shp)
        prepared = {label: _prepared(f, shp) for label, f in contenders.items()}
        t = interleaved({label: step for label, (_, step) in prepared.items()}, rounds)
        for label, (opt, _) in prepared.items():
            b = state_bytes(opt) / n
            rows.append(f"| {wl} | {label} | {CONTENDERS[label][2]} | {t[label] * 1e3:.2f} | "
                        f"**{t[label] / t[REFERENCE]:.2f}** | {b:.2f} |")
            results.append({"kind": "peer_speed", "workload": wl, "optimizer": label, "ms": t[label] * 1e3,
                            "ratio": t[label] / t[REFERENCE], "state_bytes_per_param": b})
            print(rows[-1], flush=True)
        del prepared
    return rows


def quality_rows(quick: bool, contenders: dict[str, Callable], results: list[dict]) -> list[str]:
    from .quality import _digits

    steps, seeds = (100, (0,)) if quick else (600, (0, 1, 2))
    rows = [f"| optimizer | final validation loss, digits MLP ({steps} steps, seeds {'/'.join(map(str, seeds))}) "
            "| vs torch fused AdamW |", "|---|---|---|"]
    finals = {}
    for label, factory in contenders.items():
        per_seed = [_digits(s, functools.partial(factory, weight_decay=WD, **SAME), steps, LR)[-1] for s in seeds]
        finals[label] = sum(per_seed) / len(per_seed)
    for label, v in finals.items():
        rel = (v - finals[REFERENCE]) / finals[REFERENCE] if REFERENCE in finals else math.nan
        rows.append(f"| {label} | {v:.4f} | {rel:+.2%} |")
        results.append({"kind": "peer_quality", "optimizer": label, "final_val_loss": v, "relative": rel})
        print(rows[-1], flush=True)
    return rows


def chart(results: list[dict], path: str) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install '.[plots]'): no peers.png."
    speed = [r for r in results if r["kind"] == "peer_speed"]
    workloads = list(dict.fromkeys(r["workload"] for r in speed))
    fig, axes = plt.subplots(1, len(workloads), figsize=(6 * len(workloads), 3.2), squeeze=False)
    for ax, wl in zip(axes.flat, workloads):
        rs = [r for r in speed if r["workload"] == wl]
        ratios = [r["ratio"] for r in rs]
        colors = ["tab:blue" if r["optimizer"].startswith("ours") else "tab:gray" for r in rs]
        ax.barh(range(len(rs)), [abs(x - 1.0) for x in ratios], left=[min(x, 1.0) for x in ratios], color=colors)
        ax.set_xscale("log")
        ax.axvline(1.0, color="black", linewidth=1)
        ax.set_yticks(range(len(rs)), [f"{r['optimizer']} ({r['state_bytes_per_param']:.1f} B/param)" for r in rs],
                      fontsize=8)
        ax.invert_yaxis()
        ax.set_title(wl)
        ax.set_xlabel("time per step / torch fused AdamW (log; < 1 faster)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"chart: {path}"


def section(quick: bool, rounds: int, results: list[dict], names: list[str] | None = None,
            skip_quality: bool = False) -> list[str]:
    """The report's peers section: notes for absent peers, the speed/state table, the quality table."""
    contenders, notes = available(names)
    lines = ["Peers (`python -m benchmarks peers`): AdamW at lr 1e-3, weight decay 1e-2, separate gradients; "
             f"medians of {rounds} interleaved rounds.", ""]
    lines += [f"- {n}" for n in notes] + ([""] if notes else [])
    if REFERENCE not in contenders:
        return lines + ["(the reference, torch fused AdamW, was not selected: no ratios)"]
    lines += speed_rows(quick, rounds, contenders, results)
    if not skip_quality:
        lines += [""] + quality_rows(quick, contenders, results)
    return lines


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks peers", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes and one short training run (checks it runs)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 15; --quick 3)")
    ap.add_argument("--out", default="benchmark-report", help="directory for the report (default: %(default)s)")
    ap.add_argument("--only", nargs="+", choices=list(CONTENDERS), metavar="NAME",
                    help=f"only these contenders (the reference, {REFERENCE!r}, is always run)")
    ap.add_argument("--skip-quality", action="store_true", help="no digits training runs")
    args = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    rounds = args.rounds or (3 if args.quick else 15)
    names = sorted(set(args.only) | {REFERENCE}, key=list(CONTENDERS).index) if args.only else None
    where = f"{platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}"
    header = [f"Machine: {where}. Command: python -m benchmarks peers {' '.join(argv)}".rstrip(), ""]
    print("\n".join(header), flush=True)
    results: list[dict] = []
    lines = section(args.quick, rounds, results, names, args.skip_quality)
    os.makedirs(args.out, exist_ok=True)
    note = chart(results, os.path.join(args.out, "peers.png"))
    with open(os.path.join(args.out, "peers.json"), "w") as fh:
        json.dump({"machine": where, "torch": torch.__version__, "rounds": rounds, "results": results}, fh,
                  indent=2, default=float)
    with open(os.path.join(args.out, "peers.md"), "w") as fh:
        fh.write("\n".join(header + lines + ["", "![peers](peers.png)"]) + "\n")
    print(note)
    print(f"written: {os.path.join(args.out, 'peers.md')}")
    ok = all(math.isfinite(r.get("final_val_loss", r.get("ms", 0.0))) for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
