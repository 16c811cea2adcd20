"""pytest-benchmark: each optimizer step, ours against torch's for-loop, foreach and fused paths.

    pytest benchmarks --benchmark-only            # full sizes
    BENCH_QUICK=1 pytest benchmarks --benchmark-only
"""

import os

import pytest
import torch

from optadvisor import kernels
from benchmarks.cases import OPTIMIZER_CASES, make_optimizer, training_loop, workloads

QUICK = os.environ.get("BENCH_QUICK") == "1"
WORKLOADS = workloads(QUICK)
PARAMS = [(case, path, wl) for case, (_, _, _, paths) in OPTIMIZER_CASES.items()
          for wl in WORKLOADS for path in ("ours", *paths)]


@pytest.mark.parametrize("case,path,workload", PARAMS, ids=[f"{c}|{w}|{p}" for c, p, w in PARAMS])
def test_optimizer_step(benchmark, case, path, workload):
    opt = make_optimizer(case, path, WORKLOADS[workload])
    benchmark.group = f"{case} | {workload}"
    benchmark(opt.step)


@pytest.mark.parametrize("path", ["ours", "torch-fused"])
def test_training_loop_adam(benchmark, path):
    factory = (lambda p: kernels.Adam(p, lr=1e-4)) if path == "ours" else (
        lambda p: torch.optim.Adam(p, lr=1e-4, fused=True))
    iteration, _ = training_loop(factory, depth=8 if QUICK else 40, width=64 if QUICK else 256)
    benchmark.group = "training loop (MLP, Adam)"
    benchmark(iteration)


@pytest.mark.parametrize("cache", ["cold", "warm"])
def test_first_step_and_short_loop(benchmark, cache, tmp_path_factory):
    """kernels.Adam on the digits MLP, 300 steps, in a fresh process (the default compile mode): empty
    inductor and optadvisor caches, then warm ones (see benchmarks/first_step.py)."""
    import os
    import subprocess
    import sys

    from benchmarks.first_step import LOOP

    cache_dir = tmp_path_factory.getbasetemp() / "first-step-caches"
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir / "inductor"),
           "OPTADVISOR_CACHE_DIR": str(cache_dir / "optadvisor")}
    env.pop("OPTADVISOR_COMPILE", None)
    run = [sys.executable, "-c", LOOP, "ours", "Adam", "digits"]
    if cache == "warm":
        subprocess.run(run, env=env, check=True, capture_output=True)
    elif os.path.isdir(cache_dir):
        import shutil

        shutil.rmtree(cache_dir)
    benchmark.group = "first step and 300-step loop, fresh process"
    benchmark.pedantic(lambda: subprocess.run(run, env=env, check=True, capture_output=True), rounds=1,
                       iterations=1)
