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

**No step waits for the build** (~10-20 s here): the step path asks :func:`available`, which returns the
library once it is loaded and otherwise starts the build (or the load of a cached build) on a background
thread and returns None, so that step runs the torch-op path — the same bits. :func:`library` (tests,
``kernels.warmup``) builds or loads it in the caller's thread.

**A cached library is code that runs in this process**, so it is loaded only from a directory and a file
that nobody else could have written: owned by this user (or root), not writable by group or others, the
file a regular file, not a link. The cache directory is made 0700. A cache that fails the check (a shared
team cache, a 0777 ``$XDG_CACHE_HOME``) is not used: the library is built into a private temporary
directory for this process instead, with one warning.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import platform
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

ENV_VAR = "OPTADVISOR_NATIVE"
SERIAL_BELOW = 1 << 16  # elements: below this a kernel runs on one thread (waking a team costs more)
_SOURCE = Path(__file__).with_name("native.c")
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC"]
# seconds: a compiler that does not return (a license server, a wedged mount) is killed after this long (for
# the build with OpenMP, then again without), once per process; the torch-op path then runs, never a hang
BUILD_TIMEOUT_S = 120
VERSION_TIMEOUT_S = 30
_lock = threading.Lock()
_start_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}
_compilers: dict[tuple, str | None] = {}
_building: set[str] = set()
_private_dir: list[Path] = []


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


def _trusted(st: os.stat_result) -> bool:
    """Owned by this user or root, and writable by nobody else."""
    return st.st_uid in (os.getuid(), 0) and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _trusted_path(path: Path, is_kind) -> bool:
    """``path`` itself (not a link) is of the kind ``is_kind`` tells (``stat.S_ISDIR``/``S_ISREG``) and
    trusted."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return is_kind(st.st_mode) and _trusted(st)


def _usable_cache_dir() -> Path:
    """The cache directory (made 0700 if missing) when it is trusted, else a private one (see ``_private``)."""
    cache = _cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError:
        pass
    if _trusted_path(cache, stat.S_ISDIR):
        return cache
    return _private(f"the kernel cache {cache} is not a directory owned by this user and closed to others")


def _private(why: str) -> Path:
    """A temporary directory of this process's own (0700), with one warning saying why the cache is not used."""
    if not _private_dir:
        _private_dir.append(Path(tempfile.mkdtemp(prefix="optadvisor-native-")))
        warnings.warn(f"optadvisor: {why}, so a library found there could have been planted; building a "
                      f"private copy in {_private_dir[0]} instead (set OPTADVISOR_CACHE_DIR to a directory "
                      "of your own to keep it)", RuntimeWarning, stacklevel=2)
    return _private_dir[0]


# The build runs at the lowest priority and renames its output itself: a training loop beside it keeps the
# cores, and a process that ends before the build does (a short script) leaves it to finish, so the next
# process loads the library instead of starting over. It stays in this session: a new session is a new
# scheduling group on Linux (autogroup), where nice no longer counts against this process — measured, a 0.2 s
# training loop took 5.5-10 s beside a build started with start_new_session (0.25 s beside one in the same
# session). Its own process group, so that a hung build can be killed whole.
_BUILD_SCRIPT = ('tmp="$1"; out="$2"; shift 2; trap \'rm -f "$tmp"; exit 1\' HUP INT TERM; '
                 '"$@" && mv -f "$tmp" "$out"; rc=$?; rm -f "$tmp"; exit $rc')


def _build(compiler: str, out: Path, openmp: bool) -> bool:
    flags = [*_FLAGS, "-fopenmp"] if openmp else _FLAGS
    out.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # One build of a library at a time, across processes: the build holds a lock on KEY.lock (inherited by the
    # compiler, so it is held until the build ends even when this process ends first). Short scripts run one
    # after another each started a build before the first had finished: ten niced compilers at once.
    lock = os.open(out.with_suffix(".lock"), os.O_CREAT | os.O_RDWR, 0o600)
    try:
        if not _lock_or_wait(lock, BUILD_TIMEOUT_S):
            return False
        if out.exists():  # another process built it while we waited
            return True
        return _compile(compiler, flags, out, lock)
    finally:
        os.close(lock)


def _lock_or_wait(fd: int, timeout: float) -> bool:
    """Takes the lock, waiting (this runs on the build's background thread, never in a step) for a build of
    another process to end, at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)


def _compile(compiler: str, flags: list[str], out: Path, lock: int) -> bool:
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    nice = shutil.which("nice")
    command = [*([nice, "-n", "19"] if nice else []), compiler, *flags, str(_SOURCE), "-o", tmp, "-lm"]
    group = {"process_group": 0} if sys.version_info >= (3, 11) else {}
    try:
        proc = subprocess.Popen(["/bin/sh", "-c", _BUILD_SCRIPT, "sh", tmp, str(out), *command],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                pass_fds=(lock,), **group)
    except OSError:
        os.unlink(tmp)
        return False
    try:
        proc.communicate(timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        try:
            if group:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
        except OSError:
            pass
        proc.communicate()
    if os.path.exists(tmp):
        os.unlink(tmp)
    # the rename is atomic: a process building beside us never loads a half-written file
    return proc.returncode == 0 and out.exists()


def _compiler() -> str | None:
    """``$CC``, else ``cc``, else ``gcc``, looked up once per value of ``$CC`` and ``$PATH`` (a step asks
    every time: a ``shutil.which`` per step cost ~0.1 ms)."""
    env = (os.environ.get("CC"), os.environ.get("PATH"))
    if env not in _compilers:
        _compilers[env] = shutil.which(env[0] or "cc") or shutil.which("gcc")
    return _compilers[env]


def available() -> ctypes.CDLL | None:
    """The library if it is loaded now, else None — and then, unless disabled or impossible, its build (or
    the load of a cached build) starts on a background thread, so a later call finds it. Never blocks."""
    if not enabled_by_env():
        return None
    compiler = _compiler()
    if compiler is None:
        return None
    lib = _loaded.get(compiler, _building)
    if lib is not _building:
        return lib
    with _start_lock:  # not _lock: the background thread holds that for the whole build
        if compiler not in _building and compiler not in _loaded:
            _building.add(compiler)
            threading.Thread(target=_load_in_background, args=(compiler,), name="optadvisor-native",
                             daemon=True).start()
    return None


def building() -> bool:
    """True while a background thread builds or loads the library (``available`` returns None meanwhile)."""
    return bool(_building)


def _load_in_background(compiler: str) -> None:
    try:
        library()
    finally:
        _building.discard(compiler)


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, building it (or loading a trusted cached build) in this thread on first
    use; None where that is impossible or disabled."""
    if not enabled_by_env():
        return None
    compiler = _compiler()
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
            cache = _usable_cache_dir()
            for openmp in (True, False):
                key = hashlib.sha256(b"\0".join([source, " ".join(_FLAGS).encode(), str(openmp).encode(),
                                                 version.encode(), _cpu_identity().encode()])).hexdigest()
                path = cache / f"kernels-{key[:24]}.so"
                if os.path.lexists(path) and not _trusted_path(path, stat.S_ISREG):
                    path = _private(f"the cached kernel library {path} is not a regular file owned by this "
                                    "user and closed to others") / path.name
                if path.exists() or _build(compiler, path, openmp):
                    lib = ctypes.CDLL(str(path))
                    break
        except (OSError, subprocess.SubprocessError):
            lib = None
        if lib is not None:
            f = lib.q8_step
            f.restype = ctypes.c_int
            f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                          ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                          ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
            f = lib.adam_bf16state
            f.restype = ctypes.c_int
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
