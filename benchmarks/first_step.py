"""The first step, cold and warm, and a short real loop: does a new user wait for anything?

Each measurement is a fresh process: "cold" with empty compiler caches (a new inductor cache directory and a
new optadvisor cache directory, so the C kernels are not built yet either), "warm" a second process over
the same directories. The workload is the one a new user tries first: an MLP 64-64 on scikit-learn's
digits (8x8 images, 10 classes), batch 64, 300 steps of cross-entropy; "wide" is the same loop on a
1.2M-parameter MLP (64-1024-1024-10), large enough that a compile is started in the background.
Reported: the first ``step()`` (ms), the whole loop from the first step (s), and ours / torch's ratio of
each; the losses' first call likewise.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

LOOP = textwrap.dedent("""
    import json, sys, time
    import torch
    which, name, workload = sys.argv[1], sys.argv[2], sys.argv[3]
    torch.manual_seed(0)
    try:
        from sklearn.datasets import load_digits
        X, y = load_digits(return_X_y=True)
        X = torch.tensor(X / 16.0, dtype=torch.float32); y = torch.tensor(y)
    except ImportError:  # the same shapes without scikit-learn
        X, y = torch.rand(1797, 64), torch.randint(0, 10, (1797,))
    from optadvisor import kernels
    hidden = [64, 64] if workload == "digits" else [1024, 1024]
    layers, width = [], 64
    for h in hidden:
        layers += [torch.nn.Linear(width, h), torch.nn.ReLU()]
        width = h
    net = torch.nn.Sequential(*layers, torch.nn.Linear(width, 10))
    kw = {"SGD": {"lr": 0.05, "momentum": 0.9}, "RMSprop": {"lr": 1e-3}, "Adagrad": {"lr": 0.05}}
    base = name.replace("8bit", "")
    extra = kw.get(base, {"lr": 1e-3})
    if which == "torch":
        opt = getattr(torch.optim, base)(net.parameters(), **extra)
    else:
        opt = getattr(kernels, name)(net.parameters(), **extra)
    g = torch.Generator().manual_seed(0)
    steps = []
    import gc
    gc.collect()  # both start from a collected heap: see DESCRIPTION
    t0 = time.perf_counter()
    for _ in range(300):
        idx = torch.randint(0, len(X), (64,), generator=g)
        loss = torch.nn.functional.cross_entropy(net(X[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        t = time.perf_counter()
        opt.step()
        steps.append(time.perf_counter() - t)
    total = time.perf_counter() - t0
    print(json.dumps({"first": steps[0], "loop": total, "median": sorted(steps)[150], "loss": loss.item()}))
""")

LOSS = textwrap.dedent("""
    import json, sys, time
    import torch
    which, name = sys.argv[1], sys.argv[2]
    from optadvisor import kernels
    torch.manual_seed(0)
    if name == "cross_entropy":
        x, t = torch.randn(4096, 1000, requires_grad=True), torch.randint(0, 1000, (4096,))
    elif name == "multi_margin_loss":
        x, t = torch.randn(2048, 100, requires_grad=True), torch.randint(0, 100, (2048,))
    else:
        x, t = torch.randn(1 << 20, requires_grad=True), torch.randn(1 << 20)
    fn = getattr(torch.nn.functional if which == "torch" else kernels, name)
    s = time.perf_counter()
    fn(x, t).backward()
    print(json.dumps({"first": time.perf_counter() - s}))
""")

DESCRIPTION = ("First step and a short real loop, each in a fresh process (the default compile mode a user "
               "gets): cold = empty inductor and optadvisor caches, warm = the same caches filled by the cold "
               "run (median of 3 processes; --quick: 1). digits = MLP 64-64 on scikit-learn's digits, batch "
               "64, 300 steps; wide = MLP 64-1024-1024-10 (1.2M parameters), where a compile starts in the "
               "background. Loop = from the first step to the last, forward and backward included; both processes "
               "call gc.collect() before it, else whichever happens to cross the collector's threshold first "
               "pays a full collection of the ~1.5M objects that torch and scikit-learn create at import "
               "(~0.18 s here; in this script that was ours, whose step allocates ~3 tracked objects against "
               "torch's ~1.4).")

OPTIMIZERS = ["Adam", "AdamW", "SGD", "RMSprop", "Adagrad", "Adam8bit", "AdamW8bit", "SGD8bit", "RMSprop8bit"]
LOSSES = ["cross_entropy", "mse_loss", "huber_loss", "multi_margin_loss"]


def _run(code: str, args: list[str], env: dict) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=root, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _wait_for_builds(cache: str, timeout: float = 600.0) -> None:
    """Block until no build of the C kernels holds a lock in ``cache`` (a build outlives the short process
    that started it, at the lowest priority; measuring beside it, or deleting its folder under it, would
    measure it too)."""
    import fcntl
    import glob

    for path in glob.glob(os.path.join(cache, "*.lock")):
        fd = os.open(path, os.O_RDWR)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.2)
        finally:
            os.close(fd)


def _pair(code: str, args: list[str], repeats: int) -> dict:
    """ours and torch's, each cold (fresh cache directories) then warm (``repeats`` processes, median)."""
    out = {}
    for which in ("ours", "torch"):
        with tempfile.TemporaryDirectory() as inductor, tempfile.TemporaryDirectory() as ours:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": inductor, "OPTADVISOR_CACHE_DIR": ours + "/c"}
            env.pop("OPTADVISOR_COMPILE", None)  # the default a user gets
            cold = _run(code, [which, *args], env)
            _wait_for_builds(ours + "/c")  # the C kernels' build the cold run left running: done before timing
            warm = [_run(code, [which, *args], env) for _ in range(repeats)]
        keys = [k for k in cold if k != "loss"]
        out[which] = {"cold": cold, "warm": {k: statistics.median(w[k] for w in warm) for k in keys}
                      if all("error" not in w for w in warm) else warm[0]}
    return out


def rows(quick: bool, results: list[dict]) -> list[str]:
    repeats = 1 if quick else 3
    table = ["| case | | first step ours / torch (ms) | whole loop ours / torch (s) | loop ratio |",
             "|---|---|---|---|---|"]
    workloads = [("digits", OPTIMIZERS[:1] if quick else OPTIMIZERS)] + ([] if quick else [("wide", ["Adam"])])
    for workload, names in workloads:
        for name in names:
            r = _pair(LOOP, [name, workload], repeats)
            results.append({"kind": "first_step", "case": name, "workload": workload, **r})
            table += _cold_and_warm(r, f"{name}, {workload}, 300 steps", lambda o, t: (
                f"{o['first'] * 1e3:.1f} / {t['first'] * 1e3:.1f} | {o['loop']:.3f} / {t['loop']:.3f} | "
                f"**{o['loop'] / t['loop']:.2f}**"))
    table += ["", "| loss, first call (forward + backward) | | ours / torch (ms) | difference (ms) |",
              "|---|---|---|---|"]
    for name in LOSSES[:1] if quick else LOSSES:
        r = _pair(LOSS, [name], repeats)
        results.append({"kind": "first_call", "case": name, **r})
        table += _cold_and_warm(r, name, lambda o, t: (
            f"{o['first'] * 1e3:.1f} / {t['first'] * 1e3:.1f} | {(o['first'] - t['first']) * 1e3:+.1f}"))
    return table


def _cold_and_warm(r: dict, label: str, cells) -> list[str]:
    """A row for the cold and one for the warm measurement (an error in place of the numbers, if one failed),
    printed as they come."""
    out = []
    for temp in ("cold", "warm"):
        o, t = r["ours"][temp], r["torch"][temp]
        body = f"error: {o.get('error') or t.get('error')}" if "error" in o or "error" in t else cells(o, t)
        out.append(f"| {label} | {temp} | {body} |")
    print(*out, sep="\n", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    quick = "--quick" in (sys.argv[1:] if argv is None else argv)
    print("\n".join(rows(quick, [])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
