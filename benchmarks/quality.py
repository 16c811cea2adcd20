"""``python -m benchmarks quality``: what 8-bit and bfloat16 optimizer state, and bfloat16 weights with Kahan
compensation, cost and save.

- State memory and step time, per optimizer family (AdamW, SGD with momentum, RMSprop): the bytes
  ``kernels.<X>8bit`` and ``kernels.<X>(state_dtype=torch.bfloat16)`` keep per parameter against fp32 state
  (torch's keeps the same bytes as ours), and one step's time against ours in fp32 and torch's best path
  (fused where torch has one), measured interleaved in this run, on the benchmark workloads' shapes.
- Quality: real training runs with the same hyperparameters, each family's fp32 state against its 8-bit
  (defaults: blocks of 256, parameters under 4096 elements in float) and bfloat16 state: an MLP
  64-256-256-10 on scikit-learn's bundled digits (75/25 split, 600 steps of batch 64), and a
  character-level transformer language model (2 blocks, d=128, 4 heads, context 64) on the text of Python's
  own standard-library sources (shipped with every Python), 1500 steps of batch 32; validation loss every
  50 steps, seeds 0 and 1 (digits: 0, 1, 2), the final validation loss averaged over the seeds. Learning
  rates: AdamW 1e-3 / 3e-3 (digits / LM), SGD (momentum 0.9) 0.01 / 0.1, RMSprop 3e-4 / 1e-3 (each the
  better of two or three tried with fp32 state).
- bfloat16 weights (family ``bf16-weights``): the digits run with the model in bfloat16 (AdamW, lr 1e-3),
  torch's behaviour (``torch.optim.AdamW``: every update rounded to the bfloat16 weight) against
  ``kernels.AdamW(kahan_sum=True)``, with fp32 weights as the reference. Not the language model: a
  bfloat16 transformer runs ~15x slower than a float32 one on a CPU without bfloat16 units (134 s per 100
  steps here).

Writes DIR/quality.md, DIR/quality.json and DIR/quality.png (the curves side by side, with matplotlib).
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import math
import os
import platform
import sys
import time

import torch

from optadvisor import kernels

from .cases import gpt_shapes, interleaved, make_optimizer, resnet50_shapes

EVAL_EVERY = 50


# ---- state memory and step time ----------------------------------------------------------------------------
def _state_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items() if k != "step")


# family -> (fp32 case, 8-bit case, torch's best path) in benchmarks.cases
MEMORY_CASES = {"AdamW": ("Adam", "Adam8bit", "fused"), "SGD": ("SGD-momentum", "SGD8bit-momentum", "fused"),
                "RMSprop": ("RMSprop", "RMSprop8bit", "foreach")}


def memory_rows(quick: bool, rounds: int, families: list[str]) -> tuple[list[str], list[dict]]:
    shapes = {"one 10M tensor": [(10_000_000,)], "ResNet-50 shapes": resnet50_shapes(),
              "GPT-like 60M (2 blocks, d=1024)": gpt_shapes(2, 1024, 32000, 512)}
    if quick:
        shapes = {"one 100k tensor": [(100_000,)], "50 x 1k tensors": [(1000,)] * 50}
    rows = ["| workload | optimizer | state | state MB (fp32's) | ratio | bytes/param | step ms | "
            "ours fp32 ms | torch best ms (path) | step / torch best |", "|---|---|---|---|---|---|---|---|---|---|"]
    out = []
    for name, shp in shapes.items():
        n = sum(torch.Size(s).numel() for s in shp)
        for family in families:
            if family not in MEMORY_CASES:
                continue
            fp32, q8, path = MEMORY_CASES[family]
            opts = {"8-bit": make_optimizer(q8, "ours", shp), "fp32": make_optimizer(fp32, "ours", shp),
                    "bf16": make_optimizer(fp32, "ours", shp, state_dtype=torch.bfloat16),
                    "torch": make_optimizer(fp32, path, shp)}
            size = {k: _state_bytes(o) for k, o in opts.items()}
            t = interleaved({k: o.step for k, o in opts.items()}, rounds)
            for k in ("8-bit", "bf16"):
                rows.append(f"| {name} ({n / 1e6:.1f}M) | {fp32} | {k} | {size[k] / 2**20:.1f} "
                            f"({size['fp32'] / 2**20:.1f}) | **{size[k] / size['fp32']:.3f}** | {size[k] / n:.2f} | "
                            f"{t[k] * 1e3:.2f} | {t['fp32'] * 1e3:.2f} | {t['torch'] * 1e3:.2f} ({path}) | "
                            f"**{t[k] / t['torch']:.2f}** |")
                out.append({"workload": name, "optimizer": fp32, "state": k, "bytes": size[k],
                            "fp32_bytes": size["fp32"], "ms": t[k] * 1e3, "fp32_ms": t["fp32"] * 1e3,
                            "torch_ms": t["torch"] * 1e3, "torch_path": path})
                print(rows[-1], flush=True)
            del opts
    return rows, out


# ---- quality runs ------------------------------------------------------------------------------------------
def _digits(seed: int, opt_cls, steps: int, lr: float, dtype: torch.dtype = torch.float32) -> list[float]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=gen)
    x = torch.tensor(x, dtype=torch.float32)[order]
    y = torch.tensor(y)[order]
    cut = int(0.75 * len(y))
    mean, std = x[:cut].mean(0), x[:cut].std(0) + 1e-6
    x = (x - mean) / std
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                              torch.nn.ReLU(), torch.nn.Linear(256, 10)).to(dtype)
    x = x.to(dtype)
    opt = _build(opt_cls, net, lr)
    gen = torch.Generator().manual_seed(seed)
    curve = []
    for step in range(1, steps + 1):
        idx = torch.randint(0, cut, (64,), generator=gen)
        loss = torch.nn.functional.cross_entropy(net(x[idx]).float(), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % EVAL_EVERY == 0:
            with torch.no_grad(), _evaluating(opt):
                curve.append(torch.nn.functional.cross_entropy(net(x[cut:]).float(), y[cut:]).item())
    return curve


def _build(opt_cls, model: torch.nn.Module, lr: float):
    """The optimizer over ``model``: ``opt_cls(model.parameters(), lr=lr)``, or ``opt_cls(model, lr=lr)`` for a
    factory that splits the model itself (``takes_model``: the Muon hybrid); schedule-free put in train mode."""
    opt = opt_cls(model, lr=lr) if getattr(opt_cls, "takes_model", False) else opt_cls(model.parameters(), lr=lr)
    if hasattr(opt, "train"):
        opt.train()
    return opt


class _evaluating:
    """Evaluate at the optimizer's evaluation point: schedule-free's average (eval(), then train() again)."""

    def __init__(self, opt):
        self.opt = opt if hasattr(opt, "eval") else None

    def __enter__(self):
        if self.opt is not None:
            self.opt.eval()

    def __exit__(self, *exc):
        if self.opt is not None:
            self.opt.train()


def _corpus() -> str:
    """Python's standard-library sources: text every Python installation ships."""
    import argparse as a
    import collections as c
    import inspect as i
    import typing as t
    return "".join(inspect.getsource(m) for m in (a, c, i, t))


class _CharLM(torch.nn.Module):
    def __init__(self, vocab: int, d: int = 128, heads: int = 4, blocks: int = 2, context: int = 64):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Parameter(torch.zeros(context, d))
        layer = torch.nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = torch.nn.TransformerEncoder(layer, blocks, enable_nested_tensor=False)
        self.head = torch.nn.Linear(d, vocab)
        self.register_buffer("mask", torch.nn.Transformer.generate_square_subsequent_mask(context))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.embed(idx) + self.pos[: idx.shape[1]]
        return self.head(self.blocks(h, mask=self.mask, is_causal=True))


def _charlm(seed: int, opt_cls, steps: int, lr: float, dtype: torch.dtype = torch.float32, context: int = 64,
            batch: int = 32) -> list[float]:
    text = _corpus()
    chars = sorted(set(text))
    data = torch.tensor([chars.index(ch) for ch in text])
    cut = int(0.9 * len(data))
    torch.manual_seed(seed)
    model = _CharLM(len(chars), context=context).to(dtype)
    opt = _build(opt_cls, model, lr)
    gen = torch.Generator().manual_seed(seed)
    val_starts = torch.arange(cut, len(data) - context - 1, (len(data) - cut) // 64)[:64]

    def xy(starts):
        rows = torch.stack([data[s:s + context + 1] for s in starts.tolist()])
        return rows[:, :-1], rows[:, 1:]

    curve = []
    for step in range(1, steps + 1):
        x, y = xy(torch.randint(0, cut - context - 1, (batch,), generator=gen))
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % EVAL_EVERY == 0:
            with torch.no_grad(), _evaluating(opt):
                vx, vy = xy(val_starts)
                curve.append(torch.nn.functional.cross_entropy(model(vx).flatten(0, 1).float(),
                                                               vy.flatten()).item())
    return curve


TASKS = ("digits MLP", "char transformer LM")
# family -> (variants: label -> (optimizer factory, weights dtype), learning rate per task)
FAMILIES = {
    "AdamW": ({"fp32 state": (kernels.AdamW, torch.float32), "8-bit": (kernels.AdamW8bit, torch.float32),
               "bf16 state": (functools.partial(kernels.AdamW, state_dtype=torch.bfloat16), torch.float32)},
              (1e-3, 3e-3)),
    "SGD": ({"fp32 state": (functools.partial(kernels.SGD, momentum=0.9), torch.float32),
             "8-bit": (functools.partial(kernels.SGD8bit, momentum=0.9), torch.float32),
             "bf16 state": (functools.partial(kernels.SGD, momentum=0.9, state_dtype=torch.bfloat16), torch.float32)},
            (0.01, 0.1)),
    "RMSprop": ({"fp32 state": (kernels.RMSprop, torch.float32), "8-bit": (kernels.RMSprop8bit, torch.float32),
                 "bf16 state": (functools.partial(kernels.RMSprop, state_dtype=torch.bfloat16), torch.float32)},
                (3e-4, 1e-3)),
    "bf16-weights": ({"fp32 weights": (kernels.AdamW, torch.float32),
                      "bf16 weights (torch.optim.AdamW)": (torch.optim.AdamW, torch.bfloat16),
                      "bf16 weights + kahan_sum": (functools.partial(kernels.AdamW, kahan_sum=True), torch.bfloat16)},
                     (1e-3, None)),  # a bfloat16 transformer runs ~15x slower than float32 on a CPU without bf16 units
    # Adagrad: its 8-bit and bf16-state variants come from the codecs too (kernels/optim/adagrad.py)
    "Adagrad": ({"fp32 state": (kernels.Adagrad, torch.float32), "8-bit": (kernels.Adagrad8bit, torch.float32),
                 "bf16 state": (functools.partial(kernels.Adagrad, state_dtype=torch.bfloat16), torch.float32)},
                (1e-2, 1e-2)),
    # Lion: no variant written for it, the codecs make them (kernels/optim/lion.py); its lr 10x below AdamW's
    # (Chen et al. 2023: 3-10x smaller, the update being a sign)
    "Lion": ({"fp32 state": (kernels.Lion, torch.float32), "8-bit": (kernels.Lion8bit, torch.float32),
              "bf16 state": (functools.partial(kernels.Lion, state_dtype=torch.bfloat16), torch.float32)},
             (1e-4, 3e-4)),

}


def _muon_hybrid(model, lr):
    return kernels.muon_with_adamw(model, lr=lr, weight_decay=0.01)


_muon_hybrid.takes_model = True
# the optimizers of the modern-optimizers issue beside AdamW, each at its advised settings: one learning rate per
# task where the optimizer's scale is AdamW's (NAdamW, RAdam, schedule-free AdamW — its warmup 5% of the steps,
# evaluated at its average —, Muon + AdamW with the RMS-matched scaling), its own where it differs (Lion: 10x
# lower; Adafactor: its relative step, capped by lr = 1e-2, torch's default)
MODERN = {"AdamW": (kernels.AdamW, 1.0), "NAdamW": (functools.partial(kernels.NAdam, weight_decay=0.01,
                                                                         decoupled_weight_decay=True), 1.0),
          "RAdam": (kernels.RAdam, 1.0), "ScheduleFreeAdamW": ("schedulefree", 1.0),
          "Muon + AdamW": (_muon_hybrid, 1.0), "Lion": (kernels.Lion, 0.1), "Adafactor": (kernels.Adafactor, None)}


def modern_rows(quick: bool, steps_lm: int, seeds_lm: int) -> tuple[list[str], dict]:
    """Final validation loss of each MODERN optimizer on the digits MLP (600 steps, 3 seeds) and the character
    LM (``steps_lm`` steps, ``seeds_lm`` seeds), at AdamW's learning rate of FAMILIES times its factor."""
    runs = {"digits MLP": (_digits, (0, 1, 2) if not quick else (0,), 100 if quick else 600),
            "char transformer LM": (_charlm, tuple(range(seeds_lm)), 100 if quick else steps_lm)}
    base = dict(zip(TASKS, FAMILIES["AdamW"][1]))
    rows = ["| task | steps | seeds | " + " | ".join(MODERN) + " |", "|---|---|---|" + "---|" * len(MODERN)]
    curves: dict = {}
    for task, (fn, seeds, steps) in runs.items():
        finals = {}
        for name, (cls, factor) in MODERN.items():
            lr = 1e-2 if factor is None else base[task] * factor
            if cls == "schedulefree":
                cls = functools.partial(kernels.ScheduleFreeAdamW, warmup_steps=max(1, steps // 20))
            per_seed = [fn(seed, cls, steps, lr) for seed in seeds]
            finals[name] = (sum(c[-1] for c in per_seed) / len(per_seed), lr)
            curves.setdefault(f"modern: {task}", {})[name] = [
                sum(c[i] for c in per_seed) / len(per_seed) for i in range(len(per_seed[0]))]
            print(f"{task} {name} lr={lr:g}: {finals[name][0]:.4f}", flush=True)
        best = min(v for v, _ in finals.values())
        rows.append(f"| {task} | {steps} | {len(seeds)} | " + " | ".join(
            f"{v:.4f} (lr {lr:g}){' **best**' if v == best else f', {(v - best) / best:+.1%}'}"
            for v, lr in finals.values()) + " |")
    return rows, curves


def quality_rows(quick: bool, families: list[str]) -> tuple[list[str], dict]:
    runs = {"digits MLP": (_digits, (0, 1, 2), 100 if quick else 600),
            "char transformer LM": (_charlm, (0,) if quick else (0, 1), 100 if quick else 1500)}
    rows = ["| family | task | steps | seeds | lr | final val loss: reference | variant 2 (vs reference) "
            "| variant 3 (vs reference) | wall s per variant (not a speed comparison) |",
            "|---|---|---|---|---|---|---|---|---|"]
    curves: dict = {}
    for family in families:
        variants, lrs = FAMILIES[family]
        for task, lr in zip(TASKS, lrs):
            if lr is None:
                continue
            fn, seeds, steps = runs[task]
            finals, times = {}, {}
            for label, (cls, dtype) in variants.items():
                t0 = time.perf_counter()
                per_seed = [fn(seed, cls, steps, lr, dtype) for seed in seeds]
                times[label] = time.perf_counter() - t0
                curves.setdefault(f"{family}: {task}", {})[label] = [
                    sum(c[i] for c in per_seed) / len(per_seed) for i in range(len(per_seed[0]))]
                finals[label] = sum(c[-1] for c in per_seed) / len(per_seed)
            (la, a), (lb, b), (lc, c) = finals.items()
            rows.append(f"| {family} | {task} | {steps} | {len(seeds)} | {lr:g} | {la}: {a:.4f} | "
                        f"{lb}: {b:.4f} (**{(b - a) / a:+.2%}**) | {lc}: {c:.4f} (**{(c - a) / a:+.2%}**) | "
                        f"{' / '.join(f'{t:.0f}' for t in times.values())} |")
            print(rows[-1], flush=True)
    return rows, curves


def _plot(curves: dict, path: str) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no quality.png"
    cols = 2
    rows = -(-len(curves) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(curves):]:
        ax.set_visible(False)
    for ax, (task, by_opt) in zip(axes.flat, curves.items()):
        for label, curve in by_opt.items():
            ax.plot([EVAL_EVERY * (i + 1) for i in range(len(curve))], curve, label=label)
        ax.set_title(task)
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return f"written: {path}"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks quality", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes and runs (checks it runs)")
    ap.add_argument("--out", default="benchmark-report", help="directory for the report (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES),
                    help="optimizer families to run (default: all)")
    ap.add_argument("--skip-memory", action="store_true", help="no state-memory and step-time table")
    ap.add_argument("--skip-training", action="store_true", help="only the state-memory and step-time table")
    ap.add_argument("--modern", action="store_true",
                    help="only the modern optimizers at their advised settings beside AdamW (MODERN)")
    ap.add_argument("--lm-steps", type=int, default=1500, help="--modern: character-LM steps")
    ap.add_argument("--lm-seeds", type=int, default=2, help="--modern: character-LM seeds")
    args = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    rounds = args.rounds or (3 if args.quick else 15)
    where = f"{platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}"
    header = [f"Machine: {where}. Command: python -m benchmarks quality {' '.join(argv)}".rstrip(), ""]
    print("\n".join(header), flush=True)
    if args.modern:
        args.skip_memory = True
    mem, mem_json = ([], []) if args.skip_memory else memory_rows(args.quick, rounds, args.families)
    if args.modern:
        qual, curves = modern_rows(args.quick, args.lm_steps, args.lm_seeds)
    else:
        qual, curves = ([], {}) if args.skip_training else quality_rows(args.quick, args.families)
    os.makedirs(args.out, exist_ok=True)
    note = _plot(curves, os.path.join(args.out, "quality.png")) if curves else "no training runs: no quality.png"
    with open(os.path.join(args.out, "quality.json"), "w") as fh:
        json.dump({"machine": where, "memory": mem_json, "curves": curves}, fh, indent=2, default=float)
    with open(os.path.join(args.out, "quality.md"), "w") as fh:
        fh.write("\n".join(header + ["State memory and step time (median of "
                                     f"{rounds} interleaved rounds):", ""] + mem + ["", "Quality:", ""] + qual
                           + ["", "![validation curves](quality.png)"]) + "\n")
    print(note)
    print(f"written: {os.path.join(args.out, 'quality.md')}")
    return 0 if all(math.isfinite(v) for c in curves.values() for k in c.values() for v in k) else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
