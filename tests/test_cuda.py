"""The CUDA path, proven on a GPU: ``pytest -m cuda`` (skipped where none is present).

The same comparisons as the CPU property tests, on CUDA tensors: every compiled optimizer configuration in
float32 (gradients in the buffer and tensors of their own), bfloat16/float16 against torch's for-loop path
(the precision the README promises), a bucket of more than 2**31 elements after a small one, a step that never
synchronizes the host with the device, checkpoints with torch's fused CUDA optimizers, and every catalog loss
(eager and compiled cores) against torch.nn.functional.
"""

import copy

import pytest
import torch
from strategies import (
    LOSS_CASES,
    OPTIMIZERS,
    TOLERANCES,
    assert_same,
    free_port,
    run_both,
)
from test_optimizers import COMPILED_CONFIGS

from optadvisor import kernels

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pytest -m cuda on one)")]
DEVICE = "cuda"
SPECS = [((7, 3), False, False), ((300,), True, False), ((), False, False), ((70_001,), False, False),
         ((4, 4), False, True)]


@pytest.mark.parametrize("name,kwargs", COMPILED_CONFIGS, ids=[f"{n}-{i}" for i, (n, _) in
                                                               enumerate(COMPILED_CONFIGS)])
@pytest.mark.parametrize("grads", ["separate", "in-buffer"])
def test_compiled_matches_torch_on_cuda(name, kwargs, grads):
    """float32, 20 steps, None gradients, two groups and a scheduler: torch's tolerances."""
    ref, ours, rp, op = run_both(name, dict(kwargs), SPECS, torch.float32, 20, fused=True, split=True,
                                 scheduler=True, device=DEVICE)
    assert_same(ref, ours, rp, op, torch.float32)
    if grads == "in-buffer":  # then gradients accumulate into the optimizer's buffer
        ours.zero_grad(set_to_none=False)
        ref.zero_grad(set_to_none=False)
        for p, q in zip(rp, op):
            if p.requires_grad and q.grad is not None:
                g = torch.randn_like(p)
                p.grad.add_(g)
                q.grad.add_(g)
        ref.step()
        ours.step()
        assert_same(ref, ours, rp, op, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,kwargs", [("AdamW", dict(lr=1e-3)), ("Adam", dict(lr=1e-3, weight_decay=0.1)),
                                         ("SGD", dict(lr=0.01, momentum=0.9)), ("RMSprop", dict(lr=1e-3)),
                                         ("Adagrad", dict(lr=0.01))])
def test_low_precision_compiled_tracks_torch_on_cuda(name, kwargs, dtype):
    """The compiled CUDA update rounds where torch's op-by-op path rounds (seen once: AdamW fp16 differed
    on 31.7% of elements beyond fp16 tolerance on an H200): 8 steps, the issue's shapes, no None grads."""
    specs = [((7000, 10), False, False), ((300,), False, False), ((70_001,), False, False)]
    ref, ours, rp, op = run_both(name, kwargs, specs, dtype, 8, fused=True, none_prob=0.0, device=DEVICE)
    assert_same(ref, ours, rp, op, dtype)


def test_a_bucket_over_2_31_elements_after_a_small_one_updates_every_element():
    """Plain SGD compiled on a small model first; then a parameter of 2**31 + 5 elements: every element must
    move by exactly -lr * grad (a direct call would have skipped inductor's 32-bit indexing guard)."""
    small = torch.nn.Parameter(torch.zeros(10, device=DEVICE))
    opt = kernels.SGD([small], lr=0.5, fused=True)
    for _ in range(3):
        small.grad = torch.ones_like(small)
        opt.step()
    n = (1 << 31) + 5
    big = torch.nn.Parameter(torch.zeros(n, device=DEVICE))
    big.grad = torch.ones_like(big)
    kernels.SGD([big], lr=0.5, fused=True).step()
    assert bool((big.detach() == -0.5).all())
    del big


@pytest.mark.parametrize("name", ["Adam", "SGD", "RMSprop", "Adagrad"])
@pytest.mark.parametrize("grads", ["separate", "in-buffer"])
def test_a_step_never_synchronizes(name, grads):
    """No host-device synchronization in a step (torch raises on any under sync debug mode "error"): the
    scalars go through pinned buffers asynchronously, gradients are gathered by one multi-tensor copy."""
    params = [torch.nn.Parameter(torch.randn(s, device=DEVICE)) for s in [(256, 256), (256,), (100_000,)]]
    kw = dict(lr=0.01, momentum=0.9) if name == "SGD" else dict(lr=1e-3)
    opt = OPTIMIZERS[name][0](params, fused=True, **kw)
    for _ in range(3):  # compile and warm up
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    if grads == "in-buffer":
        opt.zero_grad(set_to_none=False)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            for p in params:
                if grads == "separate":
                    p.grad = torch.randn_like(p)
                else:
                    p.grad.normal_()
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD", "Adagrad"])
def test_checkpoints_interchange_with_torchs_fused_cuda_optimizers(name):
    ours_cls, torch_cls = OPTIMIZERS[name]
    kw = dict(lr=0.01, momentum=0.9) if name == "SGD" else dict(lr=0.01)
    a = [torch.nn.Parameter(torch.randn(5, 3, device=DEVICE)), torch.nn.Parameter(torch.randn(7, device=DEVICE))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    ours, ref = ours_cls(a, fused=True, **kw), torch_cls(b, fused=True, **kw)
    for _ in range(4):
        for p, q in zip(a, b):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        ours.step()
        ref.step()
    twin = torch_cls([torch.nn.Parameter(p.detach().clone()) for p in a], fused=True, **kw)
    twin.load_state_dict(copy.deepcopy(ours.state_dict()))
    back = ours_cls([torch.nn.Parameter(p.detach().clone()) for p in b], fused=True, **kw)
    back.load_state_dict(copy.deepcopy(ref.state_dict()))
    for s_ours, s_ref in ((ours.state_dict()["state"], ref.state_dict()["state"]),
                          (back.state_dict()["state"], twin.state_dict()["state"])):
        for pid in s_ref:
            for key, v in s_ref[pid].items():
                torch.testing.assert_close(s_ours[pid][key].float().cpu(), v.float().cpu(),
                                           **TOLERANCES[torch.float32])


@pytest.mark.parametrize("name", list(LOSS_CASES))
@pytest.mark.parametrize("rows", [9, 70_000])  # the eager path, and the compiled core (64k+ elements)
def test_losses_match_torch_on_cuda(name, rows):
    case = LOSS_CASES[name]
    if name == "LinearCrossEntropyLoss":
        pytest.skip("covered by test_linear_cross_entropy_on_cuda (needs its own weight on the device)")
    torch.manual_seed(3)
    out, y = torch.randn(rows, 5, device=DEVICE), torch.randint(0, 5, (rows,), device=DEVICE)
    a, r = out.clone().requires_grad_(), out.clone().requires_grad_()
    got = case.call(a, y, case.functional, **case.kwargs)
    ref = case.reference(r, y)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    got.backward()
    ref.backward()
    torch.testing.assert_close(a.grad, r.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_on_cuda(dtype):
    torch.manual_seed(0)
    h = (torch.randn(4096, 256, device=DEVICE) * 0.1).to(dtype).requires_grad_()
    w = (torch.randn(5000, 256, device=DEVICE) * 0.1).to(dtype).requires_grad_()
    t = torch.randint(0, 5000, (4096,), device=DEVICE)
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    got = kernels.linear_cross_entropy(h, w, t, chunk_size=1024)
    ref = torch.nn.functional.cross_entropy((h2 @ w2.T).float(), t)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got.float(), ref, **tol)
    got.backward()
    ref.backward()
    torch.testing.assert_close(h.grad.float(), h2.grad.float(), **tol)
    torch.testing.assert_close(w.grad.float(), w2.grad.float(), **tol)


def _fsdp_nccl_worker(rank, world, port, out):
    import os

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    try:
        result = {}
        for which in ("torch", "ours"):
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256)).cuda()
            for m in model:
                if isinstance(m, torch.nn.Linear):
                    fully_shard(m)
            fully_shard(model)
            cls = torch.optim.AdamW if which == "torch" else kernels.AdamW
            opt = cls(model.parameters(), lr=1e-3, **({"fused": True} if which == "torch" else {}))
            x = torch.randn(64, 256, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
            times = []
            for step in range(20):
                opt.zero_grad()
                model(x).square().mean().backward()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                opt.step()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            result[which] = ([p.full_tensor().cpu() for p in model.parameters()], sorted(times[5:])[7])
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


def test_fsdp2_on_nccl_equals_torch_fused_and_reports_step_time(tmp_path):
    """FSDP2 on NCCL (one process per GPU present): AdamW equals torch's fused AdamW after 20 steps; the
    median step times of both are printed (issue 16 asks for them; no target yet)."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_nccl_available():
        pytest.skip("this torch has no NCCL")
    port = free_port()
    world = torch.cuda.device_count()
    out = str(tmp_path / "fsdp.pt")
    mp.spawn(_fsdp_nccl_worker, args=(world, port, out), nprocs=world, join=True)
    result = torch.load(out)
    (ref, t_ref), (ours, t_ours) = result["torch"], result["ours"]
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    print(f"FSDP2 x{world} GPU AdamW step: ours {t_ours:.3f} ms, torch fused {t_ref:.3f} ms "
          f"({t_ours / t_ref:.2f}x)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["AdamW8bit", "SGD8bit", "RMSprop8bit"])
def test_8bit_on_cuda_follows_the_reference(name, dtype):
    """The 8-bit optimizers on CUDA (the torch-op path, compiled): parameters within an ulp-level tolerance of
    the CPU reference of the same algorithm, and codes equal except where a rounding tie moved one level."""
    from q8reference import Reference, RMSpropReference, SGDReference

    opt_kw, ref_cls, ref_kw, key, short = {
        "AdamW8bit": (dict(lr=1e-2), Reference, dict(lr=1e-2, weight_decay=1e-2, decoupled=True), "exp_avg", "cm"),
        "SGD8bit": (dict(lr=0.05, momentum=0.9, nesterov=True), SGDReference,
                    dict(lr=0.05, momentum=0.9, nesterov=True), "momentum_buffer", "cb"),
        "RMSprop8bit": (dict(lr=1e-3, momentum=0.9), RMSpropReference, dict(lr=1e-3, momentum=0.9),
                        "momentum_buffer", "cb")}[name]
    torch.manual_seed(0)
    cpu = [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in ((5000,), (70, 130), (3,))]
    gpu = [torch.nn.Parameter(p.detach().to(DEVICE)) for p in cpu]
    opt = getattr(kernels, name)(gpu, min_8bit_size=0, block_size=256, **opt_kw)
    ref = ref_cls(cpu, block_size=256, **ref_kw)
    for _ in range(5):
        grads = [torch.randn(p.shape).to(dtype) for p in cpu]
        for p, g in zip(gpu, grads):
            p.grad = g.to(DEVICE)
        opt.step()
        ref.step(grads)
    for i, p in enumerate(gpu):
        torch.testing.assert_close(p.detach().cpu(), ref.params[i], **TOLERANCES[dtype])
        codes = opt.state[p][key].cpu().reshape(-1).int()
        assert (codes - ref.state[i][short].int()).abs().max() <= 1
        assert (codes != ref.state[i][short].int()).float().mean() < 0.01


@pytest.mark.parametrize("name", ["AdamW", "SGD", "RMSprop"])
def test_kahan_sum_on_cuda_matches_the_cpu(name):
    """kahan_sum=True with bfloat16 parameters on CUDA: param + kahan_comp within the compensation's rounding
    of the same steps on the CPU."""
    kw = {"AdamW": dict(lr=1e-3), "SGD": dict(lr=1e-2, momentum=0.9), "RMSprop": dict(lr=1e-3)}[name]
    torch.manual_seed(0)
    cpu = torch.nn.Parameter(torch.randn(70_001).bfloat16())
    gpu = torch.nn.Parameter(cpu.detach().to(DEVICE))
    a = getattr(kernels, name)([cpu], kahan_sum=True, **kw)
    b = getattr(kernels, name)([gpu], kahan_sum=True, **kw)
    for _ in range(5):
        g = (torch.randn(70_001) * 0.1).bfloat16()
        cpu.grad, gpu.grad = g, g.to(DEVICE)
        a.step()
        b.step()
    total_cpu = cpu.detach().float() + a.state[cpu]["kahan_comp"].float()
    total_gpu = (gpu.detach().float() + b.state[gpu]["kahan_comp"].float()).cpu()
    torch.testing.assert_close(total_gpu, total_cpu, rtol=2.0 ** -15, atol=1e-6)
