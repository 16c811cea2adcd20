"""Workloads and timing helpers shared by the pytest-benchmark suite and ``python -m benchmarks``."""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Callable

import torch

from optadvisor import kernels

def _torch_paths(torch_cls: type) -> tuple[str, ...]:
    """The counterpart's implementations: torch's for-loop and foreach paths, and fused where it has one; a
    reference package's one path (lion-pytorch's, called "forloop") where it has no ``foreach``."""
    sig = inspect.signature(torch_cls).parameters
    if "foreach" not in sig:
        return ("forloop",)
    return ("forloop", "foreach", "fused") if "fused" in sig else ("forloop", "foreach")


def _counterpart(entry) -> type | None:
    """The catalog entry's counterpart class, or None where its package is not installed (lion-pytorch, an
    extra: ``pip install 'optadvisor[peers]'``); such cases are left out, and the report says so."""
    try:
        return entry.torch_class()
    except ImportError:
        return None


# Every optimizer configuration in kernels' catalog whose counterpart is installed: name -> (ours, its
# counterpart, kwargs, the counterpart's paths to compare), and the bytes one fp32 step reads and writes per
# element (the bandwidth bound's numerator).
OPTIMIZER_CASES = {c.name: (e.cls, ref, c.kwargs, _torch_paths(ref))
                   for e in kernels.catalog.optimizers() if (ref := _counterpart(e)) is not None
                   for c in e.configs}
MISSING_COUNTERPARTS = {c.name: e.torch for e in kernels.catalog.optimizers() if _counterpart(e) is None
                        for c in e.configs}
BYTES_PER_ELEMENT = {c.name: c.bytes_per_element for e in kernels.catalog.optimizers() for c in e.configs}


def resnet50_shapes() -> list[tuple[int, ...]]:
    """The 161 parameter shapes of torchvision's ResNet-50 (25.6M elements), without torchvision."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    in_ch = 64
    for width, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3)):
        for b in range(blocks):
            shapes += [(width, in_ch, 1, 1), (width,), (width,), (width, width, 3, 3), (width,), (width,),
                       (width * 4, width, 1, 1), (width * 4,), (width * 4,)]
            if b == 0:
                shapes += [(width * 4, in_ch, 1, 1), (width * 4,), (width * 4,)]
            in_ch = width * 4
    return shapes + [(1000, 2048), (1000,)]


def gpt_shapes(blocks: int = 8, d: int = 2048, vocab: int = 50257, context: int = 1024) -> list[tuple[int, ...]]:
    """A GPT-2-style decoder's parameter shapes (8 blocks of d=2048: 0.51B elements, 100 tensors)."""
    shapes: list[tuple[int, ...]] = [(vocab, d), (context, d)]
    for _ in range(blocks):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return shapes + [(d,), (d,)]


def workloads(quick: bool = False, device: str = "cpu") -> dict[str, list[tuple[int, ...]]]:
    if quick:
        out = {"one 100k tensor": [(100_000,)], "50 x 1k tensors": [(1000,)] * 50}
        return {**out, "GPT-like (2 blocks, d=64)": gpt_shapes(2, 64, 500, 64)} if device != "cpu" else out
    out = {"one 10M tensor": [(10_000_000,)], "ResNet-50 shapes": resnet50_shapes(),
           "2000 x 1k tensors": [(1000,)] * 2000}
    if device != "cpu":  # a few hundred million parameters: a GPU's workload (2 GB of fp32 per copy)
        out["GPT-like 0.5B (8 blocks, d=2048)"] = gpt_shapes()
    return out


def make_optimizer(case: str, path: str, shapes: list[tuple[int, ...]], device: str = "cpu", **extra):
    """An optimizer whose gradients persist between steps, as in a ``zero_grad(set_to_none=False)`` loop.

    path: forloop/foreach/fused (torch's), ours (gradients in our buffer, where
    ``opt.zero_grad(set_to_none=False)`` puts them), ours-copy (gradients in tensors of their own, as in a
    ``set_to_none=True`` loop: the step reads large ones where they lie and copies the small ones in) or
    ours-eager."""
    ours_cls, torch_cls, kw, _ = OPTIMIZER_CASES[case]
    if ours_cls.__name__ == "Muon":  # matrices only: each tensor as (rows, the rest), a vector as one row
        shapes = [(s[0], torch.Size(s[1:]).numel()) if len(s) >= 2 else (1, torch.Size(s).numel()) for s in shapes]
    params = [torch.nn.Parameter(torch.randn(s, device=device) * 0.1) for s in shapes]
    grads = [torch.randn_like(p) * 0.01 for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    fused = {"fused": True} if "fused" in inspect.signature(ours_cls).parameters else {}  # (Adafactor: no buffer)
    if path in ("ours", "ours-copy"):
        opt = ours_cls(params, **fused, **kw, **extra)
        if path == "ours" and fused:
            opt.zero_grad(set_to_none=False)  # gradients become views of the optimizer's buffer, zeroed
            for p in params:
                p.grad.normal_(0, 0.01)
    elif path == "ours-eager":
        opt = ours_cls(params, **{k: False for k in fused}, **kw)
    else:
        selector = {"forloop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
        if "foreach" not in inspect.signature(torch_cls).parameters:  # a reference package's one path
            selector["forloop"] = {}
        opt = torch_cls(params, **selector[path], **kw)
    if hasattr(opt, "train"):  # schedule-free: steps in train mode
        opt.train()
    opt.step()  # warm-up: state allocated, compile done
    opt.step()
    return opt


def synchronized(fn: Callable[[], object], device: str) -> Callable[[], object]:
    """On a GPU, time the work, not its launch."""
    if device != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out
    return run


def bandwidth_probe(n: int = 25_000_000, device: str = "cpu") -> Callable[[], None]:
    """``a.add_(b)`` on n floats: 12 bytes per element, the machine's streaming bound in this run."""
    a, b = torch.randn(n, device=device), torch.randn(n, device=device)
    return synchronized(lambda: a.add_(b), device)


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, inner: int = 1) -> dict[str, float]:
    """Median seconds per call of each fn, measured round-robin so drifts hit every variant alike.

    The order rotates every round: what ran just before a call (whose dirty cache lines that call may have
    to write back, whose threads may still be spinning) differs from round to round, so no variant always
    follows the same neighbour."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    items = list(fns.items())
    for r in range(rounds):
        for k, fn in items[r % len(items):] + items[:r % len(items)]:
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times[k].append((time.perf_counter() - t0) / inner)
    return {k: statistics.median(v) for k, v in times.items()}


def mlp(depth: int = 40, width: int = 256) -> torch.nn.Module:
    layers: list[torch.nn.Module] = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.LayerNorm(width), torch.nn.GELU()]
    return torch.nn.Sequential(*layers)


def training_loop(opt_factory, depth: int = 40, width: int = 256, batch: int = 64, device: str = "cpu"):
    """One iteration of a real loop: zero_grad() (set_to_none=True), forward, backward, step."""
    torch.manual_seed(0)
    model = mlp(depth, width).to(device)
    opt = opt_factory(model.parameters())
    x, y = torch.randn(batch, width, device=device), torch.randn(batch, width, device=device)

    def iteration():
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()

    iteration()
    iteration()
    return synchronized(iteration, device), model


def rss_kb(field: str) -> int:
    """VmRSS / VmHWM of this process in kB (Linux); 0 elsewhere."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_peak_rss() -> bool:
    """Reset VmHWM (Linux's clear_refs); ru_maxrss cannot be reset and is inherited across exec."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_extra_mb(fn: Callable[[], object], device: str) -> float:
    """Peak memory that one call of fn adds above what was allocated before it."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    base = rss_kb("VmRSS")
    if not reset_peak_rss():
        return float("nan")
    fn()
    return max(0, rss_kb("VmHWM") - base) / 1024
