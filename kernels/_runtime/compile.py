"""One place that decides whether an update runs compiled (inductor) or eagerly, and caches the compiled kernels.

Every fused update is a pure elementwise function over flat 1-D buffers. It is compiled once per
*configuration* (the math function, its boolean flags, device type and dtype) with dynamic shapes, so a
new model size or a partial step over a slice of the buffer does not recompile. Each configuration gets a
code object of its own: dynamo counts recompiles per code object, and a handful of flag combinations times
dtypes would otherwise exceed its recompile limit and silently fall back to eager.

Scalars (lr, betas, bias corrections, ...) are passed as one small tensor, never as Python floats: a float
is baked into the graph, and torch 2.13's FX graph cache can hand back a graph holding a stale value.

**No step waits for the compiler** (``OPTADVISOR_COMPILE`` unset or on: the default). Compiling one update
takes 1-3 s with a warm inductor cache and 10-35 s cold on 2 cores, where an eager step of a small model
takes microseconds; torch's own paths have no such cost. So a configuration is compiled by one background
thread, on scratch tensors of the same dtypes, layouts and 0/1-size pattern as the call that asked for it,
while the caller runs its eager update (the same math, op for op torch's for-loop path); the compiled
kernel serves every call from the next one after it is ready. The compile starts once a configuration has
run ``COMPILE_AFTER_ELEMENTS`` (2^30) element updates eagerly — ski rental: about what the compile costs, so
a short run never pays for one (a 1.2M-parameter model gets there after ~900 steps, a 10M one after ~100)
and a long one pays at most about twice the better choice in hindsight. Calls under ``COMPILE_MIN_NUMEL`` (64k)
elements never count: measured on 2 cores (torch 2.13), the compiled Adam saves 0.01-0.04 ms a call at
4k-64k elements, 0.05-0.09 ms at 128k-256k and 1.7 ms at 512k (eager's temporaries leave the cache there),
so below 64k a compile (3-30 s of a core) repays itself only after 100,000-3,000,000 calls. While it runs,
the compile shares the cores (2 here): an eager 10k-element Adam step took 110 us against 99 alone, a
2M-element one 60-120 ms against 7.5. Compiled and eager results agree
within torch's tolerances but not bit for bit, and the switch happens when the compiler is done: for
runs that must repeat bit for bit, compile first (:func:`warmup`, ``OPTADVISOR_COMPILE=sync``,
``fused=True``) or not at all (``OPTADVISOR_COMPILE=0``, ``fused=False``); under
``torch.use_deterministic_algorithms(True)`` updates compile at first use, as with ``sync``.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch

from .kernel import (  # noqa: F401 - _chain, _is_compile_failure, user_stacklevel: read through this module too
    _chain,
    _describe,
    _is_compile_failure,
    _Kernel,
    _numel,
    _scratch,
    _scratch_sizes,
    _signature,
    user_stacklevel,
)
from .private import modes_active, transforms_active  # noqa: F401 - transforms_active: re-exported for the losses

ENV_VAR = "OPTADVISOR_COMPILE"
#: elements: a call smaller than this never starts a background compile (see the module docstring); a kernel
#: compiled for a larger call of the same configuration serves it too
COMPILE_MIN_NUMEL = 1 << 16
#: element updates run eagerly in one configuration before its compile starts (~2-4 s of eager Adam on 2
#: cores, about what the compile itself costs warm): 100 steps of a 10M-parameter model, 900 of a 1.2M one
COMPILE_AFTER_ELEMENTS = 1 << 30
_SYNC_WORDS = {"sync", "wait", "block"}
log = logging.getLogger("optadvisor.kernels")


_compiled: dict[tuple, "_Kernel"] = {}
_broken: dict[tuple, str] = {}
#: background mode: kernels ready to serve, by (configuration key, call signature)
_ready: dict[tuple, "_Kernel"] = {}
_ready_keys: set[tuple] = set()  # the configuration keys of _ready
_eager_work: dict[tuple, int] = {}  # configuration key -> elements updated eagerly so far
#: configurations (key, signature) handed to the background thread and not yet ready (or given up)
_scheduled: set[tuple] = set()
#: failures of the background thread, warned about once, from the caller's thread (so the warning names
#: the user's line, not a worker's)
_unwarned: dict[tuple, str] = {}
_jobs: "queue.Queue[tuple]" = queue.Queue()
_worker: threading.Thread | None = None
_worker_lock = threading.Lock()
_local = threading.local()  # .warming: kernels.warmup is compiling in this thread, now
_serial = itertools.count()


def compile_enabled_by_env() -> bool:
    """False when ``OPTADVISOR_COMPILE`` is set to ``0``, ``false``, ``no`` or ``off``."""
    return os.environ.get(ENV_VAR, "1").strip().lower() not in {"0", "false", "no", "off"}


def compile_synchronously() -> bool:
    """True when updates compile at first use, blocking the call (today's default before background
    compilation): ``OPTADVISOR_COMPILE=sync`` (or ``wait``/``block``), or deterministic algorithms on."""
    return (os.environ.get(ENV_VAR, "1").strip().lower() in _SYNC_WORDS
            or torch.are_deterministic_algorithms_enabled())


def resolve_fused(fused: bool | None) -> bool:
    """The user's ``fused`` argument: ``None`` means compiled unless the environment variable disables it."""
    if fused is None:
        return compile_enabled_by_env()
    if not isinstance(fused, bool):
        raise TypeError(f"'fused' must be a bool or None (got {fused!r})")
    return fused


def _fresh_copy(fn: Callable[..., Any], tag: str) -> Callable[..., Any]:
    code = fn.__code__.replace(co_name=f"{fn.__name__}__{tag}")
    copy = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


def run_fused(fn: Callable[..., Any], flags: tuple, tensors: tuple[torch.Tensor | None, ...],
              scalars: torch.Tensor, *, strict: bool, min_numel: int | None = None) -> tuple[bool, Any]:
    """Run ``fn(scalars, *flags, *tensors)`` compiled: ``(True, its result)``, or ``(False, None)`` (nothing
    was written) when no compiled kernel serves this call now, so the caller runs its eager path; raises
    instead when ``strict`` (``fused=True``: compiled at first use, blocking, or an error).

    By default a configuration without a ready kernel is handed to the background thread (calls of
    ``min_numel`` elements or more; default ``COMPILE_MIN_NUMEL``) and this call runs eagerly; ``strict``, :func:`compile_synchronously`
    and :func:`warmup` compile it here and now instead."""
    ref = tensors[0]
    if modes_active():
        # torch.compile does not trace under a user's dispatch/function mode (FlopCounterMode, a debug
        # mode, ...): fullgraph then fails with "found no compiled frames". Eager runs under the mode and
        # the mode sees its aten calls, as it sees torch.optim's. Nothing is marked broken: the compiled
        # path serves the next call made outside the mode.
        if strict:
            raise RuntimeError("fused=True, but a TorchDispatchMode or TorchFunctionMode is active and "
                               "torch.compile cannot run under it; use fused=None (the default: compiled "
                               "outside the mode, eager inside it) or fused=False")
        return False, None
    key = (fn.__qualname__, flags, ref.device, ref.dtype)
    if _unwarned:
        _warn_background_failure(fn, key)
    if key in _broken:
        if strict:
            raise RuntimeError(f"fused=True but the compiled update is unavailable: {_broken[key]}")
        return False, None
    if strict or compile_synchronously():
        kernel = _compiled.get(key)
        if kernel is None:
            kernel = _compiled[key] = _new_kernel(fn, key, "")
        return _call(kernel, fn, key, scalars, flags, tensors, strict, lambda: _compiled.pop(key, None))
    warming = getattr(_local, "warming", False)
    n = _numel(tensors)
    floor = COMPILE_MIN_NUMEL if min_numel is None else min_numel
    if not warming and key not in _ready_keys:
        # decided without building the call's signature (allocations that the collector counts): a small
        # call never asks; a larger one runs eagerly until this configuration's eager work is about what a
        # compile costs (ski rental: a short run never pays for a compile, a long one at most about twice
        # the better choice in hindsight)
        if n < floor:
            return False, None
        # an update whose eager form costs more per element than an elementwise pass (``eager_cost``: the 8-bit
        # ones, which decode, reduce and encode in many eager ops) counts for that much more
        done = _eager_work.get(key, 0) + n * getattr(fn, "eager_cost", 1)
        _eager_work[key] = done
        if done < COMPILE_AFTER_ELEMENTS:
            return False, None
    sig = _signature(tensors, scalars)
    kernel = _ready.get((key, sig))
    if kernel is None:
        if warming:
            kernel = _ready[(key, sig)] = _new_kernel(fn, key, f"_s{next(_serial)}")
            _ready_keys.add(key)
        else:
            if n >= floor and (key, sig) not in _scheduled:
                _schedule(fn, key, sig, flags, tensors, scalars)
            return False, None
    return _call(kernel, fn, key, scalars, flags, tensors, strict, lambda: _ready.pop((key, sig), None))


def _new_kernel(fn: Callable[..., Any], key: tuple, suffix: str) -> "_Kernel":
    _, flags, device, dtype = key
    tag = "_".join(str(int(f)) if isinstance(f, bool) else str(f) for f in flags) or "plain"
    return _Kernel(_fresh_copy(fn, f"{tag}_{device.type}_{str(dtype)[6:]}{suffix}"),
                   {"emulate_precision_casts": True,
                    # a parallel loop whatever size the first call had: the kernel serves every size
                    # (dynamic shapes), so the size hint of its first call must not make it single-threaded
                    "cpp.dynamic_threads": True})


def _call(kernel: "_Kernel", fn: Callable[..., Any], key: tuple, scalars: torch.Tensor, flags: tuple,
          tensors: tuple, strict: bool, forget: Callable[[], Any]) -> tuple[bool, Any]:
    try:
        result = kernel(scalars, flags, tensors)
    except Exception as exc:  # compile failures surface at the first call, before anything is written
        if not _is_compile_failure(exc):
            raise
        _broken[key] = _describe(exc)
        forget()
        if strict:
            raise RuntimeError(f"fused=True but compiling the update failed: {_broken[key]}") from exc
        _warn_failed(fn, _broken[key])
        return False, None
    return True, result


def _warn_failed(fn: Callable[..., Any], why: str) -> None:
    warnings.warn(f"optadvisor: compiling {fn.__name__} failed ({why}); using the eager "
                  f"path for this configuration. Set {ENV_VAR}=0 to silence this.", RuntimeWarning,
                  stacklevel=user_stacklevel())


def _warn_background_failure(fn: Callable[..., Any], key: tuple) -> None:
    why = _unwarned.pop(key, None)
    if why is not None:
        _warn_failed(fn, why)


def _schedule(fn: Callable[..., Any], key: tuple, sig: tuple, flags: tuple, tensors: tuple,
              scalars: torch.Tensor) -> None:
    global _worker
    # a block-wise update (8-bit state) views its buffers as (blocks, block): shrunken scratch sizes would not
    # divide by the block, and its trace would fail; it compiles on scratch inputs of the real sizes
    sizes = _scratch_sizes(tensors) if not getattr(fn, "exact_shapes", False) else {
        n: n for t in tensors if t is not None for n in t.shape}
    specs = tuple(None if t is None else (tuple(sizes[n] for n in t.shape), t.dtype, t.device, t.requires_grad)
                  for t in tensors)
    _scheduled.add((key, sig))
    log.info("optadvisor: compiling %s (%s, %s) in the background; calls run eagerly (the same math) until "
             "it is ready", fn.__name__, key[3], key[2].type)
    _jobs.put((fn, key, sig, flags, specs, scalars.detach().clone(), torch.is_grad_enabled(),
               torch.is_inference_mode_enabled(), time.perf_counter()))
    with _worker_lock:
        if _worker is None or not _worker.is_alive():
            _worker = threading.Thread(target=_work, name="optadvisor-compile", daemon=True)
            _worker.start()


def _work() -> None:
    while True:
        job = _jobs.get()
        try:
            _compile_job(*job)
        finally:
            _jobs.task_done()


def _compile_job(fn: Callable[..., Any], key: tuple, sig: tuple, flags: tuple, specs: tuple,
                 scalars: torch.Tensor, grad: bool, inference: bool, asked: float) -> None:
    try:
        if key in _broken:
            return
        kernel = _new_kernel(fn, key, f"_s{next(_serial)}")
        gen = torch.Generator().manual_seed(0)
        tensors = tuple(_scratch(spec, gen) for spec in specs)
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            kernel(scalars, flags, tensors)
        _ready[(key, sig)] = kernel
        _ready_keys.add(key)
        log.info("optadvisor: compiled %s (%s, %s) is ready after %.1f s; later calls use it", fn.__name__,
                 key[3], key[2].type, time.perf_counter() - asked)
    except Exception as exc:  # noqa: BLE001 - whatever failed, the eager path goes on and says why once
        why = _describe(exc) if _is_compile_failure(exc) else f"{_describe(exc)} (in the background compile)"
        _broken[key] = why
        _unwarned[key] = why
    finally:
        _scheduled.discard((key, sig))


def wait_for_background(timeout: float | None = None) -> bool:
    """Block until every compile handed to the background thread so far is done (ready or given up); False
    if ``timeout`` seconds passed first."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while _jobs.unfinished_tasks:
        if deadline is not None and time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


class warming:
    """Within this context, calls in this thread that have no ready kernel compile one now (``warmup``)."""

    def __enter__(self) -> None:
        self._before = getattr(_local, "warming", False)
        _local.warming = True

    def __exit__(self, *exc: Any) -> None:
        _local.warming = self._before


