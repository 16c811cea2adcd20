"""Where the C kernel library is cached and what its cache key holds.

The library is built with ``-march=native``: one built on another CPU (a shared home directory, a copied
cache) can crash with an illegal instruction, so the key must change with the CPU's model and flags, the
compiler, the flags and the source, and the cache must be where the documented variables put it.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from optadvisor.kernels._runtime import native as _native

CPUINFO = """processor\t: 0
model name\t: Example CPU 9000
flags\t\t: fpu sse2 avx2
bogomips\t: 4000.00

processor\t: 1
model name\t: Example CPU 9000
flags\t\t: fpu sse2 avx2
bogomips\t: 4000.01
Features\t: neon asimd
"""


def test_cache_dir_follows_the_documented_variables(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("OPTADVISOR_CACHE_DIR", str(tmp_path / "ours"))
    assert _native._cache_dir() == tmp_path / "ours"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _native._cache_dir() == tmp_path / "ours"  # ours wins over XDG
    monkeypatch.setenv("OPTADVISOR_CACHE_DIR", "")  # empty: as if unset
    assert _native._cache_dir() == tmp_path / "xdg" / "optadvisor"
    monkeypatch.delenv("OPTADVISOR_CACHE_DIR")
    assert _native._cache_dir() == tmp_path / "xdg" / "optadvisor"
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    assert _native._cache_dir() == tmp_path / "home" / ".cache" / "optadvisor"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert _native._cache_dir() == tmp_path / "home" / ".cache" / "optadvisor"


def _fake_cpuinfo(monkeypatch, text: str | None):
    real = Path.read_text

    def read_text(self, *args, **kwargs):
        if str(self) == "/proc/cpuinfo":
            if text is None:
                raise PermissionError(13, "Permission denied", "/proc/cpuinfo")
            return text
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)


def test_cpu_identity_is_the_model_and_flags_once_each(monkeypatch):
    """Every core repeats its lines and some change per core (bogomips): only model and flags, each once,
    sorted, make the key (else the key, and the build, would change from boot to boot)."""
    _fake_cpuinfo(monkeypatch, CPUINFO)
    assert _native._cpu_identity() == ("Features\t: neon asimd\nflags\t\t: fpu sse2 avx2\n"
                                       "model name\t: Example CPU 9000")


def test_cpu_identity_without_cpuinfo_is_the_platforms(monkeypatch):
    _fake_cpuinfo(monkeypatch, None)
    monkeypatch.setattr(_native.platform, "processor", lambda: "Example 9000")
    monkeypatch.setattr(_native.platform, "machine", lambda: "x86_64")
    assert _native._cpu_identity() == "Example 9000"
    monkeypatch.setattr(_native.platform, "processor", lambda: "")
    assert _native._cpu_identity() == "x86_64"


@pytest.fixture
def cc():
    compiler = _native.shutil.which("cc") or _native.shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler")
    return compiler


@pytest.fixture
def tries(cc, monkeypatch, tmp_path):
    """library() with an empty cache and a build that records what it was asked and fails (nothing is
    compiled): each call gives the (compiler, path, openmp) it tried, in order."""
    monkeypatch.setenv(_native.ENV_VAR, "1")
    _native.library()  # this process's own build, loaded before the cache moves
    monkeypatch.setenv("OPTADVISOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_native, "_loaded", dict(_native._loaded))
    tried: list[tuple[str, Path, bool]] = []
    monkeypatch.setattr(_native, "_build", lambda compiler, out, openmp: tried.append((compiler, out, openmp)) or False)

    def attempt():
        _native._loaded.clear()
        _native._compilers.clear()  # the compiler is looked up once per process: look again
        tried.clear()
        assert _native.library() is None
        return list(tried)

    return attempt


@pytest.fixture
def builds(tries):
    """As ``tries``, without the compiler: the (path, openmp) pairs."""
    return lambda: [(out, openmp) for _, out, openmp in tries()]


def test_library_is_cached_in_the_cache_dir_keyed_by_cpu_and_openmp(builds, monkeypatch, tmp_path):
    first = builds()
    assert [openmp for _, openmp in first] == [True, False]  # OpenMP first, then without it
    names = [p.name for p, _ in first]
    assert all(p.parent == tmp_path for p, _ in first)
    assert all(re.fullmatch(r"kernels-[0-9a-f]{24}\.so", n) for n in names) and names[0] != names[1]
    assert builds() == first  # the same machine: the same key
    monkeypatch.setattr(_native, "_cpu_identity", lambda: "another CPU")
    other = builds()
    assert {p.name for p, _ in other}.isdisjoint(names)
    monkeypatch.setattr(_native, "_FLAGS", [*_native._FLAGS, "-g"])
    assert {p.name for p, _ in builds()}.isdisjoint({p.name for p, _ in first + other})


def test_library_loads_a_cached_build_without_building(builds, monkeypatch, tmp_path):
    """A library already in the cache under this machine's key is loaded as it is, not built again."""
    real = _native.library()  # this process's library, from the real cache (the fixture emptied ours)
    if real is None:
        pytest.skip("the C library does not build here")
    (path, _), _ = builds()
    shutil.copyfile(real._name, path)
    _native._loaded.clear()
    monkeypatch.setattr(_native, "_build", lambda *a: pytest.fail("built again although cached"))
    lib = _native.library()
    assert lib is not None and Path(lib._name) == path
    assert _native.library() is lib  # loaded once per process
    _assert_declared_as_in_the_c_source(lib)


_C_TYPES = {"int": ctypes.c_int, "int64_t": ctypes.c_int64}


def _assert_declared_as_in_the_c_source(lib):
    """Each exported kernel's ctypes declaration is its C prototype's: a pointer is c_void_p, an int c_int,
    an int64_t c_int64 (without argtypes, ctypes passes a Python int as a 32-bit int: a pointer is cut)."""
    source = _native._SOURCE.read_text()
    exported = re.findall(r"^(void|int) (\w+)\(([^)]*)\) \{", source, flags=re.M)
    assert {name for _, name, _ in exported} == {"q8_step", "adam_bf16state", "sgd_bf16state", "gather_copy",
                                                 "rmsprop_bf16state"}
    for ret, name, params in exported:
        f = getattr(lib, name)
        expected = [ctypes.c_void_p if "*" in p else _C_TYPES[p.split()[-2]] for p in params.split(",")]
        assert f.argtypes == expected, name
        assert f.restype is (None if ret == "void" else ctypes.c_int), name


def test_a_corrupt_cached_library_is_not_loaded(builds, tmp_path):
    """A cached file that is no library (a half-copied cache, another platform's) leaves the torch path."""
    (path, _), (path2, _) = builds()
    path.write_bytes(b"not a shared object")
    path2.write_bytes(b"\x7fELF truncated")
    _native._loaded.clear()
    assert _native.library() is None


TINY_C = "int optadvisor_probe(int x) { return x + 1; }\n"


def test_build_writes_a_loadable_library_atomically(cc, monkeypatch, tmp_path):
    """A tiny source stands in for _native.c (the real one takes ~20 s): the built library is where asked,
    loadable, and no temporary file is left beside it; the directory is created."""
    src = tmp_path / "probe.c"
    src.write_text(TINY_C)
    monkeypatch.setattr(_native, "_SOURCE", src)
    out = tmp_path / "deep" / "cache" / "probe.so"
    assert _native._build(cc, out, openmp=False) is True
    assert sorted(p.name for p in out.parent.iterdir()) == ["probe.lock", "probe.so"]  # the build's lock stays
    assert ctypes.CDLL(str(out)).optadvisor_probe(41) == 42


def test_build_failures_return_false_and_leave_nothing(cc, monkeypatch, tmp_path, capfd):
    """Nothing on disk and nothing on the terminal: the compiler's complaints are captured (the torch path
    then runs, as documented), not printed into the user's training log."""
    src = tmp_path / "broken.c"
    src.write_text("int broken( {\n")
    monkeypatch.setattr(_native, "_SOURCE", src)
    out = tmp_path / "cache" / "broken.so"
    assert _native._build(cc, out, openmp=False) is False  # the compiler refuses the source
    assert [p.name for p in out.parent.iterdir()] == [out.with_suffix(".lock").name]  # the lock, nothing else
    assert _native._build(str(tmp_path / "no-such-compiler"), out, openmp=False) is False  # OSError
    assert [p.name for p in out.parent.iterdir()] == [out.with_suffix(".lock").name]  # the lock, nothing else
    assert capfd.readouterr() == ("", "")


def test_build_passes_the_documented_flags(monkeypatch, tmp_path):
    """The compiler sees the flags that make its float32 arithmetic torch's (no contraction into FMAs, no
    fast-math), -fopenmp only when asked, the source, the output and -lm; a recording stand-in compiler
    shows the command line."""
    log = tmp_path / "argv"
    fake = tmp_path / "fake-cc"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" >> {log}\necho "--" >> {log}\n'
                    'while [ $# -gt 0 ]; do if [ "$1" = -o ]; then echo built > "$2"; fi; shift; done\n')
    fake.chmod(0o755)
    out = tmp_path / "cache" / "k.so"
    assert _native._build(str(fake), out, openmp=True) is True
    assert _native._build(str(fake), out, openmp=False) is True
    runs = [r.strip("\n").split("\n") for r in log.read_text().split("--\n") if r]
    for argv, openmp in zip(runs, (True, False)):
        assert argv[:7] == ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno",
                            "-fno-trapping-math", "-shared", "-fPIC"]
        assert ("-fopenmp" in argv) is openmp and "-ffast-math" not in argv
        assert argv[-4] == str(_native._SOURCE) and argv[-3] == "-o" and argv[-1] == "-lm"
        assert Path(argv[-2]).parent == out.parent and argv[-2] != str(out)  # a temporary, then renamed
    assert out.read_text() == "built\n" and sorted(p.name for p in out.parent.iterdir()) == ["k.lock", "k.so"]


@pytest.mark.parametrize("value, on", [(None, True), ("1", True), ("yes", True), ("", True), ("0", False),
                                       ("false", False), ("no", False), ("off", False), (" OFF ", False),
                                       ("False", False), ("No", False), ("0 ", False)])
def test_native_code_switch(monkeypatch, value, on):
    """OPTADVISOR_NATIVE: 0/false/no/off (any case, spaces around) turn the C kernels off; anything else,
    or nothing, leaves them on."""
    if value is None:
        monkeypatch.delenv(_native.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(_native.ENV_VAR, value)
    assert _native.enabled_by_env() is on


def test_threads_one_below_the_serial_size_else_torchs(monkeypatch):
    monkeypatch.setattr(_native, "SERIAL_BELOW", 1000)
    import torch
    monkeypatch.setattr(torch, "get_num_threads", lambda: 7)
    assert [_native.threads(n) for n in (0, 1, 999, 1000, 10**9)] == [1, 1, 1, 7, 7]
    assert _native.floats((0.5, -2.0, 1e-8))[:] == pytest.approx([0.5, -2.0, 1e-8], rel=1e-7)


def _fake_compiler(path: Path, version: str) -> str:
    path.write_text(f'#!/bin/sh\nif [ "$1" = --version ]; then echo "{version}"; exit 0; fi\nexit 1\n')
    path.chmod(0o755)
    return str(path)


def test_compiler_is_cc_then_gcc_and_keys_by_its_version(tries, monkeypatch, tmp_path):
    """$CC if set, else cc, else gcc; none: no library. The key holds the compiler's --version: an upgraded
    compiler builds anew (its code may differ)."""
    which = {}
    monkeypatch.setattr(_native.shutil, "which", lambda name: which.get(name))

    def compilers():
        used = tries()
        return [c for c, _, _ in used], [out.name for _, out, _ in used]

    one = _fake_compiler(tmp_path / "one", "one 1.0")
    two = _fake_compiler(tmp_path / "two", "two 2.0")
    monkeypatch.delenv("CC", raising=False)
    assert compilers() == ([], [])  # no compiler at all
    which["gcc"] = two
    assert compilers()[0] == [two, two]
    which["cc"] = one
    assert compilers()[0] == [one, one]
    monkeypatch.setenv("CC", "mycc")
    which["mycc"] = two
    by_two = compilers()
    assert by_two[0] == [two, two]
    monkeypatch.setenv("CC", "")  # empty: as if unset
    by_one = compilers()
    assert by_one[0] == [one, one] and set(by_one[1]).isdisjoint(by_two[1])
    _fake_compiler(tmp_path / "one", "one 1.1")  # the same path, upgraded
    assert set(compilers()[1]).isdisjoint(by_one[1])


def _slow_compiler(path: Path, on_version: bool) -> str:
    """A stand-in compiler that answers after 20 s (``--version``, or a build that then succeeds): a
    Python process of its own, so that a timeout kills it and nothing is left holding the pipes."""
    path.write_text(f"#!{sys.executable}\nimport sys, time\nargs = sys.argv[1:]\n"
                    f"if {on_version!r} or args != ['--version']:\n    time.sleep(20)\n"
                    "if args == ['--version']:\n    print('slow 1.0')\n"
                    "else:\n    open(args[args.index('-o') + 1], 'w').write('built')\n")
    path.chmod(0o755)
    return str(path)


def test_a_hung_build_is_given_up(monkeypatch, tmp_path):
    """A compiler that does not return (a license server, a wedged mount) is killed after BUILD_TIMEOUT_S
    and the build fails (the torch-op path runs): a first step never hangs on it. The stand-in would
    succeed after 20 s; the limit is set to 1 s."""
    fake = _slow_compiler(tmp_path / "slow-cc", on_version=False)
    monkeypatch.setattr(_native, "BUILD_TIMEOUT_S", 1)
    out = tmp_path / "cache" / "k.so"
    assert _native._build(fake, out, openmp=False) is False
    assert [p.name for p in out.parent.iterdir()] == [out.with_suffix(".lock").name]  # the lock, nothing else


def test_a_hung_version_query_gives_no_library(tries, monkeypatch, tmp_path):
    monkeypatch.setenv("CC", _slow_compiler(tmp_path / "slow-cc", on_version=True))
    monkeypatch.setattr(_native, "VERSION_TIMEOUT_S", 1)
    assert tries() == []  # given up before any build


def test_a_compiler_whose_version_query_fails_still_builds(tries, monkeypatch, tmp_path):
    """``--version`` only feeds the cache key: a compiler that refuses it is still tried (key: no version)."""
    fake = tmp_path / "odd-cc"
    fake.write_text("#!/bin/sh\necho 'unknown option' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    assert [(c, openmp) for c, _, openmp in tries()] == [(str(fake), True), (str(fake), False)]


# -- who may have written the library we load ---------------------------------------------------------------

@pytest.fixture
def real_library():
    lib = _native.library()
    if lib is None:
        pytest.skip("the C library does not build here")
    return lib


@pytest.fixture
def planted(real_library, monkeypatch, tmp_path):
    """A cache holding, under this machine's key, a library that is not the real one (a copy of the real
    library: loading it would succeed); ``_build`` records instead of compiling."""
    monkeypatch.setenv("OPTADVISOR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(_native, "_loaded", {})
    monkeypatch.setattr(_native, "_private_dir", [])
    built: list[Path] = []

    def build(compiler, out, openmp):
        built.append(out)
        return False

    monkeypatch.setattr(_native, "_build", build)
    assert _native.library() is None  # the key's paths, asked for once
    (path, path2) = built
    built.clear()
    return path, built


def test_the_cache_directory_is_made_private(planted, tmp_path):
    path, _ = planted
    assert path.parent == tmp_path / "cache"
    assert path.parent.stat().st_mode & 0o777 == 0o700


def test_a_library_in_a_directory_others_can_write_is_never_loaded(planted, real_library, tmp_path):
    """A shared cache (mode 0777) holding a library under this machine's key: not loaded, built privately
    instead, with one warning naming the directory."""
    path, built = planted
    shutil.copyfile(real_library._name, path)
    path.chmod(0o600)
    path.parent.chmod(0o777)
    _native._loaded.clear()
    with pytest.warns(RuntimeWarning, match=r"kernel cache .*cache is not a directory owned by this user"):
        assert _native.library() is None
    assert built and all(out.parent != path.parent for out in built)  # a private directory instead
    assert all(out.parent.stat().st_mode & 0o777 == 0o700 for out in built)


@pytest.mark.parametrize("how", ["group-writable", "world-writable", "symlink"])
def test_a_cached_file_others_could_have_written_is_never_loaded(planted, real_library, tmp_path, how):
    path, built = planted
    if how == "symlink":
        target = tmp_path / "elsewhere.so"
        shutil.copyfile(real_library._name, target)
        path.symlink_to(target)
    else:
        shutil.copyfile(real_library._name, path)
        path.chmod(0o620 if how == "group-writable" else 0o602)
    _native._loaded.clear()
    with pytest.warns(RuntimeWarning, match="is not a regular file owned by this user"):
        assert _native.library() is None
    assert built and built[0].name == path.name and built[0].parent != path.parent


def test_a_trusted_cached_library_is_loaded(planted, real_library):
    path, built = planted
    shutil.copyfile(real_library._name, path)
    path.chmod(0o600)
    _native._loaded.clear()
    lib = _native.library()
    assert lib is not None and Path(lib._name) == path and built == []


def test_trust_is_ownership_and_write_bits():
    import os

    mine, root, other = os.getuid(), 0, os.getuid() + 12345

    def st(uid, mode):
        return os.stat_result((mode, 0, 0, 1, uid, 0, 0, 0, 0, 0))

    assert _native._trusted(st(mine, 0o100755)) and _native._trusted(st(root, 0o100644))
    assert not _native._trusted(st(other, 0o100600))
    assert not _native._trusted(st(mine, 0o100620)) and not _native._trusted(st(mine, 0o100602))


# -- no step waits for the build ----------------------------------------------------------------------------

def test_available_never_builds_in_the_callers_thread(monkeypatch, tmp_path):
    """``available()`` (what a step asks) returns while a build held by the test runs in the background
    (had it waited, the build would be over: it is released only after); the step path meanwhile gets
    None (the torch ops); a second call starts no second build."""
    import threading
    import time

    monkeypatch.setenv(_native.ENV_VAR, "1")
    monkeypatch.setenv("OPTADVISOR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(_native, "_loaded", {})
    monkeypatch.setattr(_native, "_compilers", {})
    monkeypatch.setattr(_native, "_building", set())
    release = threading.Event()
    calls = []

    def slow_build(compiler, out, openmp):
        calls.append(out)
        release.wait(20)
        return False

    monkeypatch.setattr(_native, "_build", slow_build)
    assert _native.available() is None
    assert _native.available() is None
    assert _native.building() and not release.is_set()
    release.set()
    deadline = time.monotonic() + 20
    while _native.building() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _native.building()
    assert len(calls) == 2  # one background load: OpenMP, then without, once
    assert _native.available() is None  # the build failed: the torch ops, for good, and no retry
    assert len(calls) == 2


def test_the_compiler_is_looked_up_once_per_process(monkeypatch):
    monkeypatch.setattr(_native, "_compilers", {})
    looked = []
    monkeypatch.setattr(_native.shutil, "which", lambda name: looked.append(name) or "/usr/bin/cc")
    for _ in range(5):
        assert _native._compiler() == "/usr/bin/cc"
    assert looked == ["cc"]



def test_one_build_at_a_time_across_processes(cc, monkeypatch, tmp_path):
    """A build of the same library already running (its lock held, here by the test) is waited for and its
    result used, never a second compiler started beside it; one that outlasts the wait is given up."""
    import fcntl
    import threading

    src = tmp_path / "probe.c"
    src.write_text(TINY_C)
    monkeypatch.setattr(_native, "_SOURCE", src)
    out = tmp_path / "cache" / "probe.so"
    out.parent.mkdir()
    held = os.open(out.with_suffix(".lock"), os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(held, fcntl.LOCK_EX)
    compiled = []
    monkeypatch.setattr(_native, "_compile", lambda *a: compiled.append(a) or False)
    result = []
    waiter = threading.Thread(target=lambda: result.append(_native._build(cc, out, openmp=False)))
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive() and not compiled  # waiting for the other build
    out.write_bytes(b"built by the other process")
    os.close(held)  # the other build ends
    waiter.join(10)
    assert result == [True] and not compiled
    monkeypatch.setattr(_native, "BUILD_TIMEOUT_S", 0.3)
    again = os.open(out.with_suffix(".lock"), os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(again, fcntl.LOCK_EX)
    try:
        assert _native._build(cc, tmp_path / "cache" / "probe.so", openmp=False) is False and not compiled
    finally:
        os.close(again)
