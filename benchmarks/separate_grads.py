"""``python -m benchmarks.separate_grads``: the step after torch's default ``zero_grad()`` on 2,000 small
tensors, with the gradients copied into the buffer by our C copy and by ``torch._foreach_copy_``, against
torch's fused optimizer and our step with the gradients already in the buffer — one process, interleaved
rounds (medians), so the copy's share of the step is measured apart from the machine's drift."""

from __future__ import annotations

import argparse

import torch

from optadvisor.kernels._runtime import grads as _grads

from .cases import interleaved, make_optimizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.separate_grads", description=__doc__)
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--tensors", type=int, default=2000)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    shapes = [(1000,)] * args.tensors
    real = _grads._native_copy
    print(f"{args.tensors} tensors of 1,000 elements, ms per step (median of {args.rounds} interleaved rounds)")
    print("| optimizer | torch fused | ours, grads in buffer | ours, C copy | ours, torch's copy | C copy / torch fused "
          "| torch's copy / torch fused |")
    print("|---|---|---|---|---|---|---|")
    for case in ("Adam", "AdamW", "SGD-momentum"):
        fns = {path: make_optimizer(case, path, shapes).step for path in ("fused", "ours", "ours-copy")}
        other = make_optimizer(case, "ours-copy", shapes)

        def torch_copy(opt=other):
            _grads._native_copy = lambda *a: False
            try:
                opt.step()
            finally:
                _grads._native_copy = real
        fns["torch-copy"] = torch_copy
        t = {k: v * 1e3 for k, v in interleaved(fns, args.rounds).items()}
        print(f"| {case} | {t['fused']:.2f} | {t['ours']:.2f} | {t['ours-copy']:.2f} | {t['torch-copy']:.2f} "
              f"| **{t['ours-copy'] / t['fused']:.2f}** | {t['torch-copy'] / t['fused']:.2f} |")


if __name__ == "__main__":
    main()
