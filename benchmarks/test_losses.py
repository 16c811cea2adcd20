"""pytest-benchmark: each loss, forward + backward, ours against torch.nn.functional (in-process).

The fresh-process comparison with both allocators and peak memory is ``python -m benchmarks.losses``.
"""

import os

import pytest

from benchmarks.losses import _step, loss_cases, make_case

CASES = loss_cases(os.environ.get("BENCH_QUICK") == "1")


@pytest.mark.parametrize("impl", ["ours", "torch"])
@pytest.mark.parametrize("name", list(CASES))
def test_loss_forward_backward(benchmark, name, impl):
    inputs, ours, ref = make_case(CASES[name])
    fn = ours if impl == "ours" else ref
    _step(inputs, fn)  # warm-up (compile)
    benchmark.group = name
    benchmark(lambda: _step(inputs, fn))
