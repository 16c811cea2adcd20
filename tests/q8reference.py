"""Plain references of the 8-bit optimizers (Adam/AdamW, SGD, RMSprop), one parameter at a time, padded to
whole blocks, in simple torch ops: what kernels' C kernel and torch-op path must equal bit for bit.

Codes: a signed moment m = sign(c) (c/127)^2 absmax (int8 c), a non-negative one v = ((c+1)/256)^2 absmax
(uint8 c), codes rounded in the square-root domain, non-finite moments stored as 0 and left out of the
block's scale (absmax: the largest finite magnitude)."""

from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

#: parameter specs for make_params: up to 5 shapes of up to 3 dims (0-dim, empty, sizes no block divides),
#: some non-contiguous
shapes = st.lists(st.tuples(st.lists(st.integers(0, 40), max_size=3).map(tuple), st.booleans(), st.just(False)),
                  min_size=1, max_size=5)


def _f32(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def _sqrt32(x: torch.Tensor) -> torch.Tensor:  # correctly rounded float32 square root
    return x.double().sqrt().float()


def _padded(t: torch.Tensor, block: int) -> torch.Tensor:
    flat = t.reshape(-1)
    return torch.cat([flat, flat.new_zeros(-flat.numel() % block)]).view(-1, block)


def decode_signed(codes: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
    q = _padded(codes, block).float()
    return (q * q.abs()) * (scales * _f32(1 / 16129)).view(-1, 1)


def decode_unsigned(codes: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
    c1 = _padded(codes, block).float() + 1.0
    return (c1 * c1) * (scales * _f32(1 / 65536)).view(-1, 1)


def encode_signed(m: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks, block) float32 moments: their first n int8 codes and the blocks' scales."""
    fm = m.abs() < math.inf
    am = torch.where(fm, m.abs(), 0.0).amax(1, keepdim=True)
    km = torch.where(am > 0, torch.full_like(am, 127.0) / _sqrt32(am), 0.0)
    cm = torch.where(fm, torch.round(_sqrt32(m.abs()) * km).clamp(max=127.0), 0.0)
    cm = torch.where(m < 0, -cm, cm)
    return cm.to(torch.int8).reshape(-1)[:n], am.view(-1)


def encode_unsigned(v: torch.Tensor, root: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks, block) non-negative float32 moments and their square roots: uint8 codes and scales."""
    fv = v < math.inf
    av = torch.where(fv, v, 0.0).amax(1, keepdim=True)
    kv = torch.where(av > 0, torch.full_like(av, 256.0) / _sqrt32(av), 0.0)
    cv = torch.where(fv, (torch.round(root * kv) - 1.0).clamp(0.0, 255.0), 0.0)
    return cv.to(torch.uint8).reshape(-1)[:n], av.view(-1)


class _PerParameter:
    """Steps each parameter that has a gradient; ``_step(i, g)`` is the algorithm."""

    def __init__(self, params, block_size):
        self.params = [p.detach().clone() for p in params]
        self.block = block_size
        self.state = [None] * len(params)

    def step(self, grads):
        for i, g in enumerate(grads):
            if g is not None:
                self._step(i, g)


class Reference(_PerParameter):
    """Adam(W) with 8-bit moments, per parameter: m = sign(c)(c/127)^2 absmax, v = ((c+1)/256)^2 absmax,
    codes rounded in the square-root domain, non-finite moments stored as 0 and left out of the scale."""

    def __init__(self, params, *, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, maximize=False,
                 decoupled=False, block_size=256):
        super().__init__(params, block_size)
        self.kw = dict(lr=lr, betas=betas, eps=eps, wd=weight_decay, maximize=maximize, decoupled=decoupled)

    def _step(self, i, g):
        kw, block, p = self.kw, self.block, self.params[i]
        n = p.numel()
        nb = -(-n // block)
        if self.state[i] is None:
            self.state[i] = dict(step=0, cm=torch.zeros(n, dtype=torch.int8), sm=torch.zeros(nb),
                                 cv=torch.zeros(n, dtype=torch.uint8), sv=torch.zeros(nb))
        s = self.state[i]
        s["step"] += 1
        t = s["step"]
        b1, b2 = kw["betas"]
        lr, wd = kw["lr"], kw["wd"]
        step_size, omb1, beta2, omb2 = _f32(lr / (1 - b1 ** t)), _f32(1 - b1), _f32(b2), _f32(1 - b2)
        inv_bc2, eps, decay, wd32 = _f32(1 / (1 - b2 ** t) ** 0.5), _f32(kw["eps"]), _f32(1 - lr * wd), _f32(wd)
        P, G = _padded(p.float(), block), _padded(g.float(), block)
        if kw["maximize"]:
            G = -G
        if wd and not kw["decoupled"]:
            G = G + wd32 * P
        elif wd:
            P = P * decay
        m = decode_signed(s["cm"], s["sm"], block)
        v = decode_unsigned(s["cv"], s["sv"], block)
        m = m + omb1 * (G - m)
        v = v * beta2 + omb2 * (G * G)
        root = _sqrt32(v)
        P = P - (step_size * m) / (root * inv_bc2 + eps)
        p.copy_(P.reshape(-1)[:n].view(p.shape))
        s["cm"], s["sm"] = encode_signed(m, n)
        s["cv"], s["sv"] = encode_unsigned(v, root, n)


class SGDReference(_PerParameter):
    """SGD with an 8-bit momentum buffer: b = momentum_now * b + keep * g (momentum_now 0 and keep 1 on a
    parameter's first step, else momentum and 1 - dampening), then p -= lr (g + momentum b) with Nesterov,
    else lr b."""

    def __init__(self, params, *, lr=1e-3, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False,
                 maximize=False, block_size=256):
        super().__init__(params, block_size)
        self.kw = dict(lr=lr, momentum=momentum, dampening=dampening, wd=weight_decay, nesterov=nesterov,
                       maximize=maximize)

    def _step(self, i, g):
        kw, block, p = self.kw, self.block, self.params[i]
        n = p.numel()
        if self.state[i] is None:
            self.state[i] = dict(step=0, cb=torch.zeros(n, dtype=torch.int8), sb=torch.zeros(-(-n // block)))
        s = self.state[i]
        s["step"] += 1
        first = s["step"] == 1
        now, keep = _f32(0.0 if first else kw["momentum"]), _f32(1.0 if first else 1 - kw["dampening"])
        P, G = _padded(p.float(), block), _padded(g.float(), block)
        if kw["maximize"]:
            G = -G
        if kw["wd"]:
            G = G + _f32(kw["wd"]) * P
        b = now * decode_signed(s["cb"], s["sb"], block) + keep * G
        u = G + _f32(kw["momentum"]) * b if kw["nesterov"] else b
        P = P - _f32(kw["lr"]) * u
        p.copy_(P.reshape(-1)[:n].view(p.shape))
        s["cb"], s["sb"] = encode_signed(b, n)


class RMSpropReference(_PerParameter):
    """RMSprop (not centered) with an 8-bit square average and momentum buffer: v = alpha v + (1-alpha) g^2,
    q = g / (sqrt(v) + eps); with momentum b = momentum b + q, p -= lr b, else p -= lr q."""

    def __init__(self, params, *, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, maximize=False,
                 block_size=256):
        super().__init__(params, block_size)
        self.kw = dict(lr=lr, alpha=alpha, eps=eps, wd=weight_decay, momentum=momentum, maximize=maximize)

    def _step(self, i, g):
        kw, block, p = self.kw, self.block, self.params[i]
        n = p.numel()
        nb = -(-n // block)
        if self.state[i] is None:
            self.state[i] = dict(step=0, cv=torch.zeros(n, dtype=torch.uint8), sv=torch.zeros(nb),
                                 cb=torch.zeros(n, dtype=torch.int8), sb=torch.zeros(nb))
        s = self.state[i]
        s["step"] += 1
        P, G = _padded(p.float(), block), _padded(g.float(), block)
        if kw["maximize"]:
            G = -G
        if kw["wd"]:
            G = G + _f32(kw["wd"]) * P
        v = decode_unsigned(s["cv"], s["sv"], block) * _f32(kw["alpha"]) + _f32(1 - kw["alpha"]) * (G * G)
        root = _sqrt32(v)
        q = G / (root + _f32(kw["eps"]))
        if kw["momentum"]:
            b = decode_signed(s["cb"], s["sb"], block) * _f32(kw["momentum"]) + q
            P = P - _f32(kw["lr"]) * b
            s["cb"], s["sb"] = encode_signed(b, n)
        else:
            P = P - _f32(kw["lr"]) * q
        p.copy_(P.reshape(-1)[:n].view(p.shape))
        s["cv"], s["sv"] = encode_unsigned(v, root, n)


# reference state name -> the optimizer's state keys it may stand for (the scales: key + "_absmax")
KEYS = {"cb": ("momentum_buffer",), "cv": ("square_avg", "exp_avg_sq"), "cm": ("exp_avg",)}


def step_both(opt, ref, params, grads):
    """Each row of ``grads`` as the parameters' gradients, then a step of ``opt`` and of the reference."""
    for row in grads:
        for p, g in zip(params, row):
            p.grad = g
        opt.step()
        ref.step(row)


def assert_bits(a, b, what):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")


def assert_matches(opt, params, ref):
    """Parameters, codes and scales equal the reference's bit for bit; parameters it never stepped have no
    state."""
    for i, p in enumerate(params):
        assert_bits(p.detach(), ref.params[i], f"param {i}")
        s = ref.state[i]
        if s is None:
            assert not opt.state.get(p)
            continue
        st_ = opt.state[p]
        for short, keys in KEYS.items():
            for key in keys:
                if short in s and key in st_:
                    assert_bits(st_[key].reshape(-1), s[short], f"{key} codes of param {i}")
                    assert_bits(st_[key + "_absmax"], s["s" + short[1]], f"{key}_absmax of param {i}")
        if "step" in st_:
            assert float(st_["step"]) == s["step"]


def bucket_offsets(opt, params) -> list[int]:
    """Each parameter's place in its (single) bucket: the index stochastic rounding's draws start from."""
    bucket = opt._buckets[0]
    ids = [id(q) for q in bucket.params]
    return [bucket.offsets[ids.index(id(p))] for p in params]


def assert_matches_reference(opt, params, ref, key, fused) -> None:
    """Parameters and the 8-bit state ``key`` against a per-parameter reference (``ref[i]``: ``p``, codes
    ``c``, scales ``s``): bit for bit eager; compiled, float32 tolerance and codes within one level."""
    for p, r in zip(params, ref):
        st_ = opt.state[p]
        if fused:
            torch.testing.assert_close(p.detach(), r["p"], rtol=1.3e-6, atol=1e-5)
            assert (st_[key].reshape(-1).int() - r["c"].int()).abs().max() <= 1
        else:
            assert torch.equal(p.detach(), r["p"])
            assert torch.equal(st_[key].reshape(-1), r["c"]) and torch.equal(st_[key + "_absmax"], r["s"])
