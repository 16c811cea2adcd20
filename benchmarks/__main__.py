"""``python -m benchmarks``: optadvisor's kernels against torch, in one run, as a report.

    python -m benchmarks              # full sizes (~50 minutes on 2 cores, peers included)
    python -m benchmarks --quick      # tiny sizes, 4-10 minutes on 2 cores: checks that everything runs, not speed
    python -m benchmarks --device cuda
    python -m benchmarks advice       # does the advice beat the naive default? (see benchmarks/advice.py)
    python -m benchmarks families     # the whole recipe on a CNN, a language model, fine-tuning (benchmarks/families.py)
    python -m benchmarks peers        # heavyball, bitsandbytes, torchao beside ours (see benchmarks/peers.py)

Writes DIR/report.md (Markdown tables: median time, ratio to torch's best path, multiple of the
memory-bandwidth bound measured in the same rounds, peak extra memory), DIR/results.json, the
pytest-benchmark JSON of the same comparisons (DIR/pytest-benchmark.json) and, with matplotlib installed
(``pip install '.[plots]'``), DIR/ratios.png. Times are medians of rounds interleaved in one process; memory
is measured per case in a fresh process (VmHWM after /proc/self/clear_refs on Linux; the CUDA allocator's
peak on a GPU).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import textwrap

import torch

from .cases import (BYTES_PER_ELEMENT, MISSING_COUNTERPARTS, OPTIMIZER_CASES, bandwidth_probe, interleaved, make_optimizer,
                    peak_extra_mb, synchronized, training_loop, workloads)


def _step_memory(case: str, path: str, workload: str, quick: bool, device: str) -> float:
    """Peak extra memory of one optimizer step, in a fresh process."""
    code = textwrap.dedent(f"""
        import json, torch
        from benchmarks.cases import make_optimizer, peak_extra_mb, workloads
        opt = make_optimizer({case!r}, {path!r}, workloads({quick!r}, {device!r})[{workload!r}], {device!r})
        print(json.dumps(peak_extra_mb(opt.step, {device!r})))
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    if proc.returncode != 0:
        return float("nan")
    return float(json.loads(proc.stdout.strip().splitlines()[-1]))


def optimizer_rows(quick: bool, rounds: int, device: str, results: list[dict],
                   cases: list[str] | None = None) -> list[str]:
    rows = ["| optimizer | workload | ours ms | torch best ms (path) | ours / torch best | ours / fused "
            "| ours x bound | torch best x bound | separate grads: ours / torch best "
            "| step peak MB ours / torch best |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    probe_n = 2_000_000 if quick else 25_000_000
    probe = bandwidth_probe(probe_n, device)
    for case, (_, _, _, paths) in OPTIMIZER_CASES.items():
        if cases and case not in cases:
            continue
        if device == "cuda":
            paths = tuple(p for p in paths if p != "forloop") or paths
        for wl_name, shapes in workloads(quick, device).items():
            n = sum(torch.Size(s).numel() for s in shapes)
            opts = {path: make_optimizer(case, path, shapes, device) for path in ("ours", "ours-copy", *paths)}
            fns = {path: synchronized(opt.step, device) for path, opt in opts.items()}
            fns["bound"] = probe
            t = interleaved(fns, rounds)
            gbps = 12 * probe_n / t.pop("bound")
            # (None: no bandwidth bound stated — Adafactor's reductions read the gradient more than once)
            bound = BYTES_PER_ELEMENT[case] * n / gbps if BYTES_PER_ELEMENT[case] else float("nan")
            best = min(paths, key=lambda k: t[k])
            mem_ours = mem_best = float("nan")  # --quick: one workload per case is enough to check it runs
            measure = not quick or wl_name == next(iter(workloads(quick, device)))
            if measure and device == "cuda":  # the CUDA allocator's own peak, in this process
                mem_ours, mem_best = (peak_extra_mb(opts[k].step, device) for k in ("ours", best))
            del fns, opts
            if measure and device != "cuda":  # a fresh process per case: RSS peaks cannot be reset in-process
                mem_ours = _step_memory(case, "ours", wl_name, quick, device)
                mem_best = _step_memory(case, best, wl_name, quick, device)
            fused = f"{t['ours'] / t['fused']:.2f}" if "fused" in t else "-"
            rows.append(f"| {case} | {wl_name} | {t['ours'] * 1e3:.2f} | {t[best] * 1e3:.2f} ({best}) | "
                        f"**{t['ours'] / t[best]:.2f}** | {fused} | {t['ours'] / bound:.2f} | "
                        f"{t[best] / bound:.2f} | {t['ours-copy'] / t[best]:.2f} | "
                        + (f"{mem_ours:.1f} / {mem_best:.1f} |" if measure else "- (--quick: first workload only) |"))
            results.append({"kind": "optimizer", "case": case, "workload": wl_name, "times_s": t,
                            "best_torch_path": best, "ratio": t["ours"] / t[best], "bound_s": bound,
                            "step_peak_mb": {"ours": mem_ours, best: mem_best}})
            print(rows[-1], flush=True)
    for case, ref in MISSING_COUNTERPARTS.items():
        if not cases or case in cases:
            rows.append(f"| {case} | not measured: its counterpart {ref} is not installed "
                        "(pip install 'optadvisor[peers]') | | | | | | | | |")
            print(rows[-1], flush=True)
    return rows


def training_rows(quick: bool, rounds: int, device: str, results: list[dict]) -> list[str]:
    configs = [(8, 64, 64)] if quick else [(40, 256, 64)]
    if device != "cpu" and not quick:
        configs.append((12, 2048, 512))  # the wide loop GPU users run
    rows = ["| case | ours | torch fused Adam | ours / torch | check |", "|---|---|---|---|---|"]
    for depth, width, batch in configs:
        rows.append(_training_row(depth, width, batch, rounds, device, results))
    return rows


def _training_row(depth: int, width: int, batch: int, rounds: int, device: str, results: list[dict]) -> str:
    from optadvisor import kernels

    ours, m1 = training_loop(lambda p: kernels.Adam(p, lr=1e-4), depth, width, batch, device=device)
    ref, m2 = training_loop(lambda p: torch.optim.Adam(p, lr=1e-4, fused=True), depth, width, batch, device=device)
    t = interleaved({"ours": ours, "torch fused": ref}, rounds)
    same = all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(m1.parameters(), m2.parameters()))
    results.append({"kind": "training_loop", "depth": depth, "width": width, "batch": batch, "times_s": t,
                    "ratio": t["ours"] / t["torch fused"], "params_equal": same})
    return (f"| training loop, {depth}-layer MLP width {width}, batch {batch}, Adam | {t['ours'] * 1e3:.2f} ms | "
            f"{t['torch fused'] * 1e3:.2f} ms | **{t['ours'] / t['torch fused']:.2f}** | params equal: {same} |")


def loss_rows(quick: bool, rounds: int, device: str, results: list[dict]) -> list[str]:
    from .losses import loss_cases, loss_table, make_case, _step

    if device == "cpu":
        return loss_table(quick, rounds, results)
    rows = ["| loss (forward + backward) | ours ms | torch ms | ours / torch | peak MB ours | peak MB torch |",
            "|---|---|---|---|---|---|"]
    for name, spec in loss_cases(quick).items():
        inputs, ours, ref = make_case({**spec, "device": device})
        fns = {"ours": synchronized(lambda: _step(inputs, ours), device),
               "torch": synchronized(lambda: _step(inputs, ref), device)}
        for f in fns.values():
            f()
        t = interleaved(fns, rounds)
        mem = {k: peak_extra_mb(f, device) for k, f in fns.items()}
        rows.append(f"| {name} | {t['ours'] * 1e3:.2f} | {t['torch'] * 1e3:.2f} | **{t['ours'] / t['torch']:.2f}** "
                    f"| {mem['ours']:.0f} | {mem['torch']:.0f} |")
        results.append({"kind": "loss", "case": name, "times_s": t, "ratio": t["ours"] / t["torch"],
                        "peak_mb": mem})
        print(rows[-1], flush=True)
    return rows


def pytest_benchmark_json(out: str, quick: bool) -> str:
    """Run the pytest-benchmark suite (same comparisons) and keep its JSON."""
    try:
        import pytest_benchmark  # noqa: F401
    except ImportError:
        return "pytest-benchmark is not installed (pip install '.[test]'): no pytest-benchmark JSON."
    path = os.path.join(out, "pytest-benchmark.json")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, **({"BENCH_QUICK": "1"} if quick else {})}
    fast = ["--benchmark-min-rounds=1", "--benchmark-max-time=0.02", "--benchmark-warmup=off"] if quick else []
    proc = subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "--benchmark-only", "-q", "-p",
                           "no:cacheprovider", f"--benchmark-json={path}", *fast], cwd=root, env=env,
                          capture_output=True, text=True)
    return f"pytest-benchmark JSON: {path}" if proc.returncode == 0 else (
        "pytest-benchmark run failed:\n" + proc.stdout[-2000:] + proc.stderr[-2000:])


def chart(results: list[dict], path: str, source: str | None = None) -> str:
    """The ratios as bars on a log axis; ``source`` is recorded in the PNG (``python -m benchmarks readme``
    checks that the README's chart was drawn from the results beside it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install '.[plots]'): no chart."
    labels = [f"{r['case']} | {r.get('workload', '')}".strip(" |") for r in results if "case" in r and "ratio" in r]
    ratios = [r["ratio"] for r in results if "case" in r and "ratio" in r]
    fig, ax = plt.subplots(figsize=(10, 0.32 * len(labels) + 1.5))
    colors = ["tab:green" if x <= 1 else "tab:red" for x in ratios]
    # bars from 1.0 on a log axis: 0.5x and 2x are as long, and one noisy 60x bar no longer flattens the rest
    ax.barh(range(len(labels)), [abs(x - 1.0) for x in ratios], left=[min(x, 1.0) for x in ratios], color=colors)
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("time, ours / torch's best path (< 1: ours is faster)")
    ax.set_title("optadvisor kernels vs torch")
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Source": source} if source else None)
    plt.close(fig)
    return f"chart: {path}"


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    if args_in and args_in[0] == "advice":  # the advice benchmark: python -m benchmarks advice [--quick]
        from .advice import main as advice_main
        return advice_main(args_in[1:])
    if args_in and args_in[0] == "readme":  # the README's figures from benchmarks/latest/ (benchmarks/readme.py)
        from .readme import main as readme_main
        return readme_main(args_in[1:])
    if args_in and args_in[0] == "peers":  # heavyball, bitsandbytes, torchao beside ours (benchmarks/peers.py)
        from .peers import main as peers_main
        return peers_main(args_in[1:])
    if args_in and args_in[0] == "families":  # the training recipe on CNN, LM and fine-tuning workloads
        from .families import main as families_main
        return families_main(args_in[1:])
    if args_in and args_in[0] == "quality":  # 8-bit state: memory, step time, training quality
        from .quality import main as quality_main
        return quality_main(args_in[1:])
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 4-10 minutes on 2 cores (checks it runs, not speed)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds per case (median taken)")
    ap.add_argument("--out", default="benchmark-report", help="directory for the report (default: %(default)s)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--skip-losses", action="store_true")
    ap.add_argument("--skip-peers", action="store_true",
                    help="no peers section (heavyball, bitsandbytes, torchao: benchmarks/peers.py)")
    ap.add_argument("--skip-pytest", action="store_true", help="do not run the pytest-benchmark suite")
    ap.add_argument("--skip-first-step", action="store_true",
                    help="do not measure the first step and the 300-step loop in fresh processes")
    ap.add_argument("--cases", nargs="+", choices=list(OPTIMIZER_CASES), help="only these optimizer cases")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("python -m benchmarks: error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    rounds = args.rounds or (3 if args.quick else 15)
    if args.device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    where = (torch.cuda.get_device_name() if args.device == "cuda"
             else f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads")
    header = [f"Machine: {where}; torch {torch.__version__}. Command: python -m benchmarks "
              f"{' '.join(sys.argv[1:] if argv is None else argv)}".rstrip(),
              "",
              f"Medians of {rounds} interleaved rounds; ratios < 1 mean ours is faster; 'x bound' = time / (bytes "
              "moved / bandwidth of a.add_(b) measured in the same rounds); step peak = extra memory one step "
              "allocates, measured in a fresh process. Optimizer steps: gradients persist between steps, as in "
              "a zero_grad(set_to_none=False) loop (ours: in the optimizer's buffer, where that call puts them); "
              "'separate grads' times our step when every gradient is a tensor of its own, as after torch's "
              "default zero_grad(set_to_none=True): large ones are read where they lie, small ones copied "
              "into the buffer first. The training loop uses that default.", ""]
    print("\n".join(header), flush=True)
    results: list[dict] = []
    sections = [optimizer_rows(args.quick, rounds, args.device, results, args.cases), [""],
                training_rows(args.quick, rounds, args.device, results)]
    print("\n".join(sections[-1]), flush=True)
    if args.device == "cpu" and not args.skip_first_step:
        from .first_step import DESCRIPTION, rows as first_step_rows

        sections += [["", DESCRIPTION, ""], first_step_rows(args.quick, results)]
    if not args.skip_losses:
        sections += [[""], loss_rows(args.quick, rounds, args.device, results)]
    if args.device == "cpu" and not args.skip_peers:
        from .peers import section as peers_section

        sections += [[""], peers_section(args.quick, rounds, results)]
    os.makedirs(args.out, exist_ok=True)
    extras = []
    if not args.skip_pytest:
        extras.append(pytest_benchmark_json(args.out, args.quick))
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump({"machine": where, "torch": torch.__version__, "rounds": rounds, "results": results}, fh,
                  indent=2, default=float)
    with open(os.path.join(args.out, "results.json"), "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()
    extras.insert(0, chart(results, os.path.join(args.out, "ratios.png"), source=f"results.json sha256 {digest}"))
    if any(r.get("kind") == "peer_speed" for r in results):
        from .peers import chart as peers_chart

        extras.insert(1, peers_chart(results, os.path.join(args.out, "peers.png")))
    with open(os.path.join(args.out, "report.md"), "w") as fh:
        fh.write("\n".join(header + [line for sec in sections for line in sec]) + "\n")
    print("\n".join(extras + [f"written: {os.path.join(args.out, 'report.md')}"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
