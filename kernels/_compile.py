"""One place that decides whether an update runs compiled (inductor) or eagerly, and caches the compiled kernels.

Every fused update is a pure elementwise function over flat 1-D buffers. It is compiled once per
*configuration* (the math function, its boolean flags, device type and dtype) with dynamic shapes, so a
new model size or a partial step over a slice of the buffer does not recompile. Each configuration gets a
code object of its own: dynamo counts recompiles per code object, and a handful of flag combinations times
dtypes would otherwise exceed its recompile limit and silently fall back to eager.

Scalars (lr, betas, bias corrections, ...) are passed as one small tensor, never as Python floats: a float
is baked into the graph, and torch 2.13's FX graph cache can hand back a graph holding a stale value.
"""

from __future__ import annotations

import os
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch

ENV_VAR = "OPTADVISOR_COMPILE"

_compiled: dict[tuple, Callable[..., Any]] = {}
_broken: dict[tuple, str] = {}


def compile_enabled_by_env() -> bool:
    """False when ``OPTADVISOR_COMPILE`` is set to ``0``, ``false``, ``no`` or ``off``."""
    return os.environ.get(ENV_VAR, "1").strip().lower() not in {"0", "false", "no", "off"}


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
              scalars: torch.Tensor, *, strict: bool) -> tuple[bool, Any]:
    """Run ``fn(scalars, *flags, *tensors)`` compiled: ``(True, its result)``, or ``(False, None)`` (nothing
    was written) when compiling is impossible here, so the caller runs its eager path; raises instead when
    ``strict``."""
    ref = tensors[0]
    key = (fn.__qualname__, flags, ref.device.type, ref.dtype)
    if key in _broken:
        if strict:
            raise RuntimeError(f"fused=True but the compiled update is unavailable: {_broken[key]}")
        return False, None
    compiled = _compiled.get(key)
    if compiled is None:
        tag = "_".join(str(int(f)) if isinstance(f, bool) else str(f) for f in flags) or "plain"
        compiled = torch.compile(_fresh_copy(fn, f"{tag}_{ref.device.type}_{str(ref.dtype)[6:]}"),
                                 dynamic=True, fullgraph=True,
                                 options={"emulate_precision_casts": True,
                                          # a parallel loop whatever size the first call had: the
                                          # kernel serves every size (dynamic shapes), so the size
                                          # hint of its first call must not make it single-threaded
                                          "cpp.dynamic_threads": True})
        _compiled[key] = compiled
    try:
        result = compiled(scalars, *flags, *tensors)
    except Exception as exc:  # compile failures surface at the first call, before anything is written
        if not _is_compile_failure(exc):
            raise
        _broken[key] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        _compiled.pop(key, None)
        if strict:
            raise RuntimeError(f"fused=True but compiling the update failed: {_broken[key]}") from exc
        warnings.warn(f"optadvisor: compiling {fn.__name__} failed ({_broken[key]}); using the eager "
                      f"path for this configuration. Set {ENV_VAR}=0 to silence this.", RuntimeWarning,
                      stacklevel=3)
        return False, None
    return True, result


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
