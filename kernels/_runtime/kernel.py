"""The compiled kernel of one configuration (``_Kernel``: the ``torch.compile`` entry point and the direct
call plan recorded at its first call), the scratch inputs a background compile traces on, and how a compile
failure is recognized and described. ``compile`` (this room's dispatcher) decides when each is used."""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable
from typing import Any

import torch

from .private import capturing_backend, global_state_guard, innermost, same_values

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # kernels/
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_INT32_LIMIT = 1 << 31  # a call over this many elements takes the guarded entry point (int32 indexing)


class _Kernel:
    """One configuration's compiled update.

    ``guarded`` is the ``torch.compile`` entry point: dynamo checks its guards on every call and compiles
    or recompiles when they fail. That check costs ~170 us per call once a step's streaming has evicted
    the caches (measured here: ~230 us cold through ``torch.compile`` against ~55 us calling the compiled
    graph itself), which is 5-7% of a 10M-element Adam step. So the backend also records how inductor's
    compiled graph takes its arguments (its placeholders: our tensors and their sizes), and later calls with
    the same kinds of arguments call that graph *directly*. A direct call is taken only where dynamo's
    guards would pass by construction: a graph with dynamic sizes and no outputs, the same tensors present,
    1-D contiguous tensors of one length >= 2 (dynamo specializes 0 and 1), the same global state
    (grad mode, autocast, ...: dynamo's own ``GlobalStateGuard``) and no torch function/dispatch mode;
    anything else goes through ``guarded``. Where inductor's own entry point can be found under AOT
    autograd's runtime wrapper (another ~40 us cold), it is called instead, after giving the same bits as
    the wrapped graph once on scratch inputs. If torch's internals differ from what this expects, no plan
    is recorded and every call is guarded: slower, never different.
    """

    def __init__(self, fn: Callable[..., Any], options: dict[str, Any]) -> None:
        code = fn.__code__
        self.argnames = code.co_varnames[:code.co_argcount]
        self.varargs = code.co_varnames[code.co_argcount] if code.co_flags & inspect.CO_VARARGS else None
        self.direct: tuple[Callable[..., Any], tuple, int, Any, tuple] | None = None
        self._pending: tuple | None = None
        backend = capturing_backend(self, options)
        if backend is None:
            self.guarded = torch.compile(fn, dynamic=True, fullgraph=True, options=options)
        else:
            self.guarded = torch.compile(fn, dynamic=True, fullgraph=True, backend=backend)

    # -- capture (runs inside dynamo's backend call, before inductor takes ownership of the graph) --
    def capture(self, compiled: Callable[..., Any], plan: tuple | None) -> None:
        if plan is not None:
            self._pending = (compiled, plan)

    def __call__(self, scalars: torch.Tensor, flags: tuple, tensors: tuple) -> Any:
        direct = self.direct
        if direct is not None:
            call, plan, hp_len, state_guard, present = direct
            if self._direct_ok(scalars, tensors, hp_len, state_guard, present):
                args = (scalars, *flags, *tensors)
                call([args[i] if kind else args[i].shape[0] for kind, i in plan])
                return None
        state_guard = global_state_guard()
        self._pending = None
        result = self.guarded(scalars, *flags, *tensors)
        pending, self._pending = self._pending, None
        if pending is not None and result is None and state_guard is not None and self.direct is None:
            compiled, plan = pending
            call = innermost(compiled, plan, scalars, flags, tensors) or (lambda a: compiled(*a))
            if self._serves_other_sizes(call, plan, scalars, flags, tensors):
                self.direct = (call, plan, scalars.shape[0], state_guard, tuple(t is not None for t in tensors))
        return result

    def _serves_other_sizes(self, call: Callable[[list], Any], plan: tuple, scalars: torch.Tensor, flags: tuple,
                            tensors: tuple) -> bool:
        """A direct call skips dynamo's guards, so it is only recorded once it has shown, on scratch inputs of
        two other lengths, the same bits as the guarded call: a graph that inductor specialized to one size
        (seen: plain SGD's update compiled for 5 elements, later called with 2, failed inside inductor)
        stays guarded instead."""
        n = next(t.shape[0] for t in tensors if t is not None)
        try:
            for length in (37, 41) if n not in (37, 41) else (43, 47):
                gen = torch.Generator(device=scalars.device).manual_seed(length)
                inputs = [None if t is None else torch.rand(length, generator=gen, device=t.device).to(t.dtype)
                          for t in tensors]
                direct = [None if t is None else t.clone() for t in inputs]
                guarded = [None if t is None else t.clone() for t in inputs]
                args = (scalars, *flags, *direct)
                call([args[i] if kind else args[i].shape[0] for kind, i in plan])
                saved, self._pending = self._pending, None
                try:
                    self.guarded(scalars, *flags, *guarded)
                finally:
                    self._pending = saved
                if not all(a is None or same_values(a, b) for a, b in zip(direct, guarded)):
                    return False
        except Exception:  # noqa: BLE001 - a graph that cannot take another size: keep every call guarded
            return False
        return True

    @staticmethod
    def _direct_ok(scalars: torch.Tensor, tensors: tuple, hp_len: int, state_guard: Any,
                   present: tuple) -> bool:
        if scalars.dim() != 1 or scalars.shape[0] != hp_len or len(tensors) != len(present):
            return False
        n = None
        for t, there in zip(tensors, present):
            if (t is not None) != there:
                return False
            if t is None:
                continue
            if t.dim() != 1 or not t.is_contiguous():
                return False
            if n is None:
                n = t.shape[0]
            elif t.shape[0] != n:
                return False
        # no user dispatch/function mode either: run_fused, this kernel's only caller, has checked that.
        # Below 2**31 elements only: inductor compiles 32-bit indexing behind a size guard of its own, which a
        # direct call would skip (seen on CUDA: a >2**31-element bucket after a small one read out of bounds);
        # a larger call goes through the guards, which recompile it with 64-bit indexing.
        return n is not None and 2 <= n < _INT32_LIMIT and state_guard.check()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _numel(tensors: tuple) -> int:
    return max((t.numel() for t in tensors if t is not None), default=0)


def _signature(tensors: tuple, scalars: torch.Tensor) -> tuple:
    """What a compiled graph is specialized on beyond the configuration key (dynamo's guards): which tensors
    are present, their dtypes, ranks, contiguity and which sizes are 0 or 1 (specialized; every other size
    is dynamic), the scalars' length and dtype, and the thread's grad and inference modes."""
    return (scalars.shape[0], scalars.dtype, scalars.device, torch.is_grad_enabled(),
            torch.is_inference_mode_enabled(),
            tuple(None if t is None else (t.dtype, t.dim(), t.is_contiguous(), t.requires_grad,
                                          tuple(min(n, 2) for n in t.shape)) for t in tensors))


def _scratch_sizes(tensors: tuple) -> dict[int, int]:
    """Sizes for the background compile's scratch inputs: 0 and 1 kept (dynamo specializes them), sizes up to
    4096 kept, larger ones mapped to 4097, 4098, ... in order (equal sizes stay equal, unequal ones unequal,
    and a reduction over more than 4096 elements stays one), so a 10M-element update compiles on ~4k."""
    sizes = sorted({n for t in tensors if t is not None for n in t.shape})
    large = [n for n in sizes if n > 4096]
    return {**{n: n for n in sizes if n <= 4096}, **{n: 4097 + i for i, n in enumerate(large)}}


def _scratch(spec: tuple | None, gen: torch.Generator) -> torch.Tensor | None:
    if spec is None:
        return None
    shape, dtype, device, requires_grad = spec
    if dtype.is_floating_point:
        # positive values: an update may take the square root of a state (a variance)
        t = torch.rand(shape, generator=gen).to(device=device, dtype=dtype)
    else:
        t = torch.zeros(shape, dtype=dtype, device=device)  # class 0, code 0, a zero salt: valid everywhere
    return t.requires_grad_(requires_grad)


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning raised by this function's caller point at the first frame
    outside this package and torch: the user's ``opt.step()`` or loss call (callers sit at different depths:
    an optimizer's step, torch's step hooks, a module's ``__call__``)."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith((_PACKAGE_DIR, _TORCH_DIR)):
        frame, level = frame.f_back, level + 1
    return level


def _is_compile_failure(exc: BaseException) -> bool:
    names = {type(e).__name__ for e in _chain(exc)}
    modules = {type(e).__module__ for e in _chain(exc)}
    return bool(names & {"BackendCompilerFailed", "InductorError", "CppCompileError", "Unsupported",
                         "InvalidCxxCompiler", "CalledProcessError"}
                or any(m.startswith(("torch._dynamo", "torch._inductor")) for m in modules))


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__
