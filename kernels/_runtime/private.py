"""Every private torch API the kernels use, in one place (torch has no public equivalent for any of them).

- :func:`transforms_active` / :func:`modes_active`: whether a torch.func transform or a user's dispatch or
  function mode is active (the losses refuse the first; compiled calls step aside for the second).
- The guard-skipping direct call of ``_compile._Kernel``: :func:`capturing_backend` wraps torch.compile's own
  inductor backend to record how the compiled graph takes its arguments (:func:`call_plan`, from dynamo's
  placeholder names and shape environment), :func:`innermost` finds inductor's entry point under AOT
  autograd's wrapper, and :func:`global_state_guard` is dynamo's own check of grad mode, autocast, etc.

Each degrades to the slower public path when torch's internals differ: no plan is recorded and every call
goes through ``torch.compile``'s guards. ``tests/test_optimizers.py::test_private_torch_apis_still_work``
fails loudly in CI when a torch upgrade moves any of them, so the degradation is never silent.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch


def transforms_active() -> bool:
    """A torch.func transform (grad, vmap, jvp, ...) is active (torch has no public query)."""
    return torch._C._are_functorch_transforms_active()


def modes_active() -> bool:
    """A user's TorchDispatchMode or TorchFunctionMode is active (torch has no public query for either)."""
    return torch._C._len_torch_dispatch_stack() > 0 or torch._C._is_torch_function_mode_enabled()


def innermost(compiled: Callable[..., Any], plan: tuple, scalars: torch.Tensor, flags: tuple,
               tensors: tuple) -> Callable[[list], Any] | None:
    """Inductor's own entry point under AOT autograd's runtime wrapper (another ~40 us per call with cold
    caches), when it can be found and provably does the same: it is run once on scratch inputs beside the
    wrapped graph and must give the same bits. None otherwise (the wrapped graph is then called)."""
    found = _find_compiled_fx_graph(compiled)
    runner = getattr(found, "current_callable", None)
    if not callable(runner):
        return None
    try:
        gen = torch.Generator(device=scalars.device).manual_seed(0)
        inputs = [None if t is None else torch.rand(37, generator=gen, device=t.device).to(t.dtype)
                  for t in tensors]
        outer = [None if t is None else t.clone() for t in inputs]
        inner = [None if t is None else t.clone() for t in inputs]

        def args(ts: list) -> list:
            a = (scalars, *flags, *ts)
            return [a[i] if kind else a[i].shape[0] for kind, i in plan]
        compiled(*args(outer))
        runner(args(inner))
        same = all(a is None or same_values(a, b) for a, b in zip(outer, inner))
        changed = any(a is not None and not same_values(a, b) for a, b in zip(outer, inputs))
    except Exception:  # pragma: no cover - an internal layout this does not know: keep the wrapper
        return None
    return runner if same and changed else None


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal element for element, NaN matching NaN."""
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def _find_compiled_fx_graph(fn: Any, depth: int = 0, seen: set | None = None) -> Any:
    """Search a compiled function's wrappers (closures, ``__wrapped__``, attributes) for inductor's
    CompiledFxGraph."""
    seen = set() if seen is None else seen
    if depth > 8 or id(fn) in seen:
        return None
    seen.add(id(fn))
    if type(fn).__name__ == "CompiledFxGraph":
        return fn
    children = []
    closure = getattr(fn, "__closure__", None)
    if closure:
        for cell in closure:
            try:
                children.append(cell.cell_contents)
            except ValueError:
                pass
    for attr in ("__wrapped__", "compiled_fn", "_inner_compiled_fn", "fn"):
        child = getattr(fn, attr, None) if not isinstance(fn, type) else None
        if child is not None:
            children.append(child)
    for child in children:
        if callable(child) or type(child).__name__ == "CompiledFxGraph":
            hit = _find_compiled_fx_graph(child, depth + 1, seen)
            if hit is not None:
                return hit
    return None


def global_state_guard() -> Any:
    try:
        return torch._C._dynamo.guards.GlobalStateGuard()
    except Exception:  # pragma: no cover - a torch without it: every call stays guarded
        return None


def capturing_backend(kernel: Any, options: dict[str, Any]) -> Callable[..., Any] | None:
    """torch.compile's own inductor backend, wrapped to record each compiled graph's calling plan."""
    try:
        inner = torch._TorchCompileInductorWrapper(None, options, True)
    except Exception:  # pragma: no cover - private API moved: plain torch.compile, all calls guarded
        return None

    class Capturing:
        compiler_name = "inductor"

        def __call__(self, gm: Any, example_inputs: Any, **kwargs: Any) -> Any:
            try:
                plan = call_plan(gm, kernel.argnames, kernel.varargs)
            except Exception:  # pragma: no cover - unexpected graph metadata: stay guarded
                plan = None
            compiled = inner(gm, example_inputs, **kwargs)
            kernel.capture(compiled, plan)
            return compiled

        def __getattr__(self, name: str) -> Any:
            return getattr(inner, name)

    return Capturing()


_SIZE_SOURCE = re.compile(r"^L\['(\w+)'\](?:\[(\d+)\])?\.size\(\)\[0\]$")
_TENSOR_NAME = re.compile(r"^l_([a-z_0-9]+?)(?:_(\d+))?_$")


def call_plan(gm: Any, argnames: tuple[str, ...], varargs: str | None = None) -> tuple | None:
    """How the dynamo graph's placeholders come from our arguments: ``(1, i)`` the i-th argument itself,
    ``(0, i)`` its length. None unless every placeholder is one of those, every tensor but the first
    (the scalars) has a dynamic length, no shape guard involves those lengths, and the graph returns
    nothing (an update writes in place)."""
    from torch._subclasses.fake_tensor import FakeTensor

    ctx = torch._guards.TracingContext.try_get()
    shape_env = ctx.fake_mode.shape_env if ctx is not None and ctx.fake_mode is not None else None
    if shape_env is None:
        return None
    index = {name: i for i, name in enumerate(argnames)}

    def position(name: str | None, item: str | None) -> int | None:
        if item is None:
            return index.get(name)
        return len(argnames) + int(item) if name == varargs else None
    sources = {str(sym): [s.name for s in srcs] for sym, srcs in shape_env.var_to_sources.items()}
    plan, data_syms, hp_syms = [], set(), set()
    for node in gm.graph.nodes:
        if node.op == "output":
            outs = node.args[0]
            if outs not in ((), [], None) and not (isinstance(outs, (tuple, list)) and len(outs) == 0):
                return None
            continue
        if node.op != "placeholder":
            continue
        value = node.meta.get("example_value")
        if isinstance(value, FakeTensor):
            match = _TENSOR_NAME.match(node.name)
            if match is None and varargs is None:
                return None
            pos = None if match is None else position(*match.groups())
            if pos is None and match is not None and match.group(2) is not None:
                pos = index.get(f"{match.group(1)}_{match.group(2)}")  # a name ending in _<digits>
            if pos is None or value.dim() != 1:
                return None
            size = value.shape[0]
            if not isinstance(size, torch.SymInt):
                return None  # a specialized size: this graph is not the general one
            (hp_syms if pos == 0 else data_syms).add(str(size.node.expr))
            plan.append((1, pos))
        elif isinstance(value, torch.SymInt):
            sym = str(value.node.expr)
            match = next((m for m in map(_SIZE_SOURCE.match, sources.get(sym, ())) if m), None)
            pos = None if match is None else position(*match.groups())
            if pos is None:
                return None
            plan.append((0, pos))
        else:
            return None
    for guard in shape_env.guards:
        if {str(s) for s in guard.expr.free_symbols} & data_syms:
            return None
    return tuple(plan)
