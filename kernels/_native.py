"""The CPU kernels of the 8-bit optimizers (Adam/AdamW, SGD, RMSprop), of bfloat16 state and the copy of
separate gradients into the gradient buffer (``_native.c``), compiled once per machine and loaded with ctypes.

Why C and not ``torch.compile`` here: the update needs, per block, a reduction (the new absmax) followed by
an elementwise pass that uses it. Inductor (torch 2.13, CPU) schedules these as separate loops over the
whole buffer, materializing float32 temporaries, and loads int8/uint8 vectors through a slow partial-load
path: its fastest formulation measured 54 ms per step on a 10M-element tensor where torch's fused fp32
Adam takes 8 ms. The C kernel keeps each block in L1 between the two passes.

The library is built with the C compiler that inductor also needs (``$CC``, else ``cc``), without
``-ffast-math`` and with ``-ffp-contract=off`` so that its float32 arithmetic is torch's, op for op (the
tests compare it bit for bit with the torch-op path). It is cached under ``$OPTADVISOR_CACHE_DIR`` (default
``~/.cache/optadvisor``), keyed by the source, the flags, the compiler and this CPU's model and flags. Where
no compiler works, or ``OPTADVISOR_NATIVE=0``, :func:`library` returns None and the torch-op path runs:
the same numbers, slower.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

ENV_VAR = "OPTADVISOR_NATIVE"
SERIAL_BELOW = 1 << 16  # elements: below this a kernel runs on one thread (waking a team costs more)
_SOURCE = Path(__file__).with_name("_native.c")
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC"]
# seconds: a compiler that does not return (a license server, a wedged mount) is killed after this long (for
# the build with OpenMP, then again without), once per process; the torch-op path then runs, never a hang
BUILD_TIMEOUT_S = 120
VERSION_TIMEOUT_S = 30
_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}


def enabled_by_env() -> bool:
    return os.environ.get(ENV_VAR, "1").strip().lower() not in {"0", "false", "no", "off"}


def _cpu_identity() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [line for line in text.splitlines() if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(keep)))


def _cache_dir() -> Path:
    base = os.environ.get("OPTADVISOR_CACHE_DIR")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "optadvisor"


def _build(compiler: str, out: Path, openmp: bool) -> bool:
    flags = [*_FLAGS, "-fopenmp"] if openmp else _FLAGS
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *flags, str(_SOURCE), "-o", tmp, "-lm"], capture_output=True,
                              timeout=BUILD_TIMEOUT_S, check=False)
        if done.returncode != 0:
            return False
        os.replace(tmp, out)  # atomic: a process building beside us never loads a half-written file
        return True
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, building it on first use; None where that is impossible or disabled."""
    if not enabled_by_env():
        return None
    compiler = shutil.which(os.environ.get("CC") or "cc") or shutil.which("gcc")
    if compiler is None:
        return None
    with _lock:
        if compiler in _loaded:
            return _loaded[compiler]
        lib = None
        try:
            version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                                     timeout=VERSION_TIMEOUT_S, check=False).stdout
            source = _SOURCE.read_bytes()
            for openmp in (True, False):
                key = hashlib.sha256(b"\0".join([source, " ".join(_FLAGS).encode(), str(openmp).encode(),
                                                 version.encode(), _cpu_identity().encode()])).hexdigest()
                path = _cache_dir() / f"kernels-{key[:24]}.so"
                if path.exists() or _build(compiler, path, openmp):
                    lib = ctypes.CDLL(str(path))
                    break
        except (OSError, subprocess.SubprocessError):
            lib = None
        if lib is not None:
            f = lib.q8_step
            f.restype = None
            f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                          ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                          ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
            f = lib.adam_bf16state
            f.restype = None
            f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                          ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int]
            f = lib.sgd_bf16state
            f.restype = None
            f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                          ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
            f = lib.gather_copy
            f.restype = ctypes.c_int
            f.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                          ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
            f = lib.rmsprop_bf16state
            f.restype = None
            f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                          ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_int, ctypes.c_int]
        _loaded[compiler] = lib
        return lib


def floats(values: tuple[float, ...]) -> ctypes.Array:
    """A step's scalars as the float32 array the kernels take (keep it alive for the call)."""
    return (ctypes.c_float * len(values))(*values)


def threads(n: int) -> int:
    """Threads for a call over ``n`` elements: torch's count, or one for small calls."""
    import torch

    return 1 if n < SERIAL_BELOW else torch.get_num_threads()
