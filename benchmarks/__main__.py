"""``python -m benchmarks [--quick] [--out DIR]``: ours against torch, interleaved, with the bandwidth bound.

Prints a Markdown table (median step time, ratio to torch's best path, multiple of the memory-bandwidth
bound measured in the same rounds) and writes it to DIR/report.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import textwrap

import torch

from .cases import (
    BYTES_PER_ELEMENT,
    OPTIMIZER_CASES,
    bandwidth_probe,
    interleaved,
    make_optimizer,
    training_loop,
    workloads,
)


def optimizer_table(quick: bool, rounds: int) -> list[str]:
    rows = ["| optimizer | workload | ours ms | torch best ms (path) | ours / torch best | ours / fused "
            "| ours x bound | torch best x bound |", "|---|---|---|---|---|---|---|---|"]
    probe_n = 2_000_000 if quick else 25_000_000
    probe = bandwidth_probe(probe_n)
    for case, (_, _, _, paths) in OPTIMIZER_CASES.items():
        for wl_name, shapes in workloads(quick).items():
            n = sum(torch.Size(s).numel() for s in shapes)
            fns = {"ours": make_optimizer(case, "ours", shapes).step}
            for path in paths:
                fns[path] = make_optimizer(case, path, shapes).step
            fns["bound"] = probe
            t = interleaved(fns, rounds)
            gbps = 12 * probe_n / t.pop("bound")
            bound = BYTES_PER_ELEMENT[case] * n / gbps
            best = min(paths, key=lambda k: t[k])
            fused = f"{t['ours'] / t['fused']:.2f}" if "fused" in t else "-"
            rows.append(f"| {case} | {wl_name} | {t['ours'] * 1e3:.2f} | {t[best] * 1e3:.2f} ({best}) | "
                        f"**{t['ours'] / t[best]:.2f}** | {fused} | {t['ours'] / bound:.2f} | "
                        f"{t[best] / bound:.2f} |")
            print(rows[-1], flush=True)
            del fns
    return rows


def training_rows(quick: bool, rounds: int) -> list[str]:
    import kernels

    depth, width = (8, 64) if quick else (40, 256)
    ours, m1 = training_loop(lambda p: kernels.Adam(p, lr=1e-4), depth, width)
    ref, m2 = training_loop(lambda p: torch.optim.Adam(p, lr=1e-4, fused=True), depth, width)
    t = interleaved({"ours": ours, "torch fused": ref}, rounds)
    same = all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(m1.parameters(), m2.parameters()))
    return [f"| training loop, {depth}-layer MLP width {width}, Adam | {t['ours'] * 1e3:.2f} ms | "
            f"{t['torch fused'] * 1e3:.2f} ms | **{t['ours'] / t['torch fused']:.2f}** | params equal: {same} |"]


COMPILE_SNIPPET = textwrap.dedent("""
    import time, torch, kernels
    p = [torch.nn.Parameter(torch.randn(1000)) for _ in range(10)]
    for q in p: q.grad = torch.randn(1000)
    opt = kernels.Adam(p)
    t = time.perf_counter(); opt.step(); print(time.perf_counter() - t)
""")


def compile_times() -> tuple[float, float]:
    """First-step time of kernels.Adam in a fresh process with an empty, then a warm, inductor cache."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        out = [float(subprocess.run([sys.executable, "-c", COMPILE_SNIPPET], env=env, capture_output=True,
                                    text=True, check=True).stdout.split()[-1]) for _ in range(2)]
    return out[0], out[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds per case (median taken)")
    ap.add_argument("--out", default="benchmark-report", help="directory for report.md")
    args = ap.parse_args(argv)
    rounds = args.rounds or (5 if args.quick else 15)
    torch.set_num_threads(os.cpu_count() or 1)
    header = [f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads. Medians of {rounds} interleaved rounds; ratios < 1 mean "
              "ours is faster. 'bound' = bytes moved / bandwidth of a.add_(b) measured in the same rounds.", ""]
    print("\n".join(header), flush=True)
    rows = optimizer_table(args.quick, rounds)
    loop = ["", "| case | ours | torch fused Adam | ours / torch | check |", "|---|---|---|---|---|",
            *training_rows(args.quick, rounds)]
    print("\n".join(loop), flush=True)
    cold, warm = compile_times()
    comp = ["", f"First step of kernels.Adam (compile): {cold:.1f} s with an empty inductor cache, "
                f"{warm:.1f} s with a warm one."]
    print("\n".join(comp))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "report.md"), "w") as fh:
        fh.write("\n".join(header + rows + loop + comp) + "\n")
    print(f"\nwritten: {os.path.join(args.out, 'report.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
