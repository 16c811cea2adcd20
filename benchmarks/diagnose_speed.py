"""``python -m benchmarks.diagnose_speed``: how long ``diagnose`` takes on long histories (a record per step of
a long run: 10k to 1M records, train and validation loss, gradient norm, learning rate). Target: 1M records
in under 5 s (its running median was quadratic: 60k records took 21-26 s)."""

from __future__ import annotations

import random
import sys
import time


def history(n: int, seed: int = 0) -> list[dict[str, float]]:
    rng = random.Random(seed)
    rows = [{"step": i, "train_loss": 2.0 / (1 + i / 1000) + 0.1 * rng.random(), "grad_norm": 1 + rng.random(),
             "lr": 1e-3} for i in range(n)]
    for i in range(0, n, 1000):
        rows[i]["val_loss"] = 1.0 + i / (2 * n)
    return rows


def main(argv: list[str] | None = None) -> int:
    from optadvisor.advisor import diagnose

    sizes = [int(a) for a in (sys.argv[1:] if argv is None else argv)] or [10_000, 100_000, 1_000_000]
    print("| records | diagnose s |\n|---|---|")
    for n in sizes:
        rows = history(n)
        start = time.perf_counter()
        diagnose(rows)
        print(f"| {n:,} | {time.perf_counter() - start:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
