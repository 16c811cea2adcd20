"""Loss benchmarks: forward + backward of ours against torch.nn.functional, time and peak extra memory.

Each case runs in fresh processes: one that times ours and torch interleaved, and one per implementation
that measures the peak extra resident memory (VmHWM after /proc/self/clear_refs), so allocator state and
the high-water mark of one case never leak into another. Run ``python -m benchmarks.losses [--quick]``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F

from optadvisor import kernels

from .cases import interleaved, peak_extra_mb


def loss_cases(quick: bool) -> dict[str, dict]:
    """Each case named by the sizes it runs (--quick divides them by 16, and says so in the names)."""
    s = 16 if quick else 1
    specs = [dict(kind="ce", n=8192 // s, c=32000 // s), dict(kind="ce", n=65536 // s, c=10),
             dict(kind="lce", n=4096 // s, d=1024 // s, v=32000 // s), dict(kind="mse", n=10_000_000 // s),
             dict(kind="huber", n=10_000_000 // s), dict(kind="mm", n=8192 // s, c=1000 // s),
             dict(kind="hinge", n=10_000_000 // s)]
    return {_name(spec): spec for spec in specs}


def _name(spec: dict) -> str:
    def count(n: int) -> str:
        return f"{n / 1e6:g}M" if n >= 1_000_000 else f"{n / 1e3:g}k" if n >= 10_000 else str(n)
    kind = spec["kind"]
    if kind in ("ce", "mm"):
        return f"{'cross_entropy' if kind == 'ce' else 'multi_margin_loss'} ({spec['n']}, {spec['c']})"
    if kind == "lce":
        return f"linear_cross_entropy h({spec['n']},{spec['d']}) W({spec['v']},{spec['d']})"
    return f"{dict(mse='mse_loss', huber='huber_loss', hinge='hinge_loss')[kind]} {count(spec['n'])}"


def make_case(spec: dict):
    """(inputs needing grad, ours(), torch()) for one case; each call runs forward + backward."""
    torch.manual_seed(0)
    device = spec.get("device", "cpu")
    kind = spec["kind"]

    def randn(*shape):
        return torch.randn(*shape, device=device)

    def randint(high, shape):
        return torch.randint(0, high, shape, device=device)

    if kind == "ce":
        x = randn(spec["n"], spec["c"]).requires_grad_()
        t = randint(spec["c"], (spec["n"],))
        return [x], (lambda: kernels.cross_entropy(x, t)), (lambda: F.cross_entropy(x, t))
    if kind == "lce":
        h = (randn(spec["n"], spec["d"]) * 0.1).requires_grad_()
        w = (randn(spec["v"], spec["d"]) * 0.1).requires_grad_()
        t = randint(spec["v"], (spec["n"],))
        return [h, w], (lambda: kernels.linear_cross_entropy(h, w, t)), (lambda: F.cross_entropy(F.linear(h, w), t))
    if kind in ("mse", "huber", "hinge"):
        x = randn(spec["n"]).requires_grad_()
        if kind == "hinge":
            y = randint(2, (spec["n"],)).float() * 2 - 1
            return [x], (lambda: kernels.hinge_loss(x, y)), (lambda: torch.clamp(1 - y * x, min=0).mean())
        y = randn(spec["n"])
        if kind == "mse":
            return [x], (lambda: kernels.mse_loss(x, y)), (lambda: F.mse_loss(x, y))
        return [x], (lambda: kernels.huber_loss(x, y)), (lambda: F.huber_loss(x, y))
    x = randn(spec["n"], spec["c"]).requires_grad_()
    t = randint(spec["c"], (spec["n"],))
    return [x], (lambda: kernels.multi_margin_loss(x, t)), (lambda: F.multi_margin_loss(x, t))


def _step(inputs, fn):
    for t in inputs:
        t.grad = None
    fn().backward()


def _child(mode: str, spec: dict, rounds: int) -> dict:
    torch.set_num_threads(os.cpu_count() or 1)
    inputs, ours, ref = make_case(spec)
    if mode == "time":
        fns = {"ours": lambda: _step(inputs, ours), "torch": lambda: _step(inputs, ref)}
        for f in fns.values():
            f()
        return interleaved(fns, rounds)
    if mode == "all":  # --quick: one process measures everything (checks it runs, not fidelity)
        return {"time": _child("time", spec, rounds), "mem-ours": _child("mem-ours", spec, rounds),
                "mem-torch": _child("mem-torch", spec, rounds)}
    fn = ours if mode == "mem-ours" else ref
    _step(inputs, fn)  # warm-up: a compile (and its memory) happens here, not in the measured call
    for t in inputs:
        t.grad = torch.zeros_like(t)  # the gradient itself is not "extra": both need it

    def measured():
        for t in inputs:
            t.grad = None
        fn().backward()
    return {"extra_mb": peak_extra_mb(measured, "cpu")}


def run_case(name: str, spec: dict, rounds: int, tuned_malloc: bool, processes: int = 3) -> dict:
    env = dict(os.environ)
    if tuned_malloc:
        env.update(MALLOC_MMAP_THRESHOLD_="100000000000", MALLOC_TRIM_THRESHOLD_="100000000000",
                   MALLOC_MMAP_MAX_="0")
    def child(mode: str) -> dict:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.losses", "--child", mode, json.dumps(spec),
                               str(rounds)], env=env, capture_output=True, text=True, check=True)
        return json.loads(proc.stdout.strip().splitlines()[-1])

    if processes == 0:
        return child("all")
    # where glibc places big buffers differs between processes (torch's CE once 163 ms, once 1580 ms with
    # the same settings): time in three processes and take each side's median
    times = [child("time") for _ in range(processes)]
    out = {"time": {k: statistics.median(t[k] for t in times) for k in times[0]}}
    for mode in ("mem-ours", "mem-torch"):
        out[mode] = child(mode)
    return out


def loss_table(quick: bool, rounds: int, results: list[dict] | None = None) -> list[str]:
    rows = ["| loss (forward + backward) | malloc | ours ms | torch ms | ours / torch | extra MB ours | "
            "extra MB torch | ours / torch |", "|---|---|---|---|---|---|---|---|"]
    for name, spec in loss_cases(quick).items():
        for tuned in ((False,) if quick else (False, True)):  # --quick checks that it runs, not speed
            r = run_case(name, spec, rounds, tuned, processes=0 if quick else 3)
            t, mo, mt = r["time"], r["mem-ours"]["extra_mb"], r["mem-torch"]["extra_mb"]
            mem_ratio = f"{mo / mt:.2f}" if mt > 0.5 else "-"
            rows.append(f"| {name} | {'tuned' if tuned else 'default'} | {t['ours'] * 1e3:.2f} | "
                        f"{t['torch'] * 1e3:.2f} | **{t['ours'] / t['torch']:.2f}** | {mo:.0f} | {mt:.0f} | "
                        f"{mem_ratio} |")
            print(rows[-1], flush=True)
            if results is not None:
                results.append({"kind": "loss", "case": f"{name} ({'tuned' if tuned else 'default'} malloc)",
                                "times_s": t, "ratio": t["ours"] / t["torch"],
                                "extra_mb": {"ours": mo, "torch": mt}})
    return rows


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(_child(sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]))))
    else:
        quick = "--quick" in sys.argv
        print("\n".join(loss_table(quick, 3 if quick else 7)))
