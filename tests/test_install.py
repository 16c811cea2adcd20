"""The wheel installs under one namespace, beside the packages that own the top-level names we gave up.

`kernels` is Hugging Face's kernel hub (which bitsandbytes' CPU backend imports as `from kernels import
get_kernel`); before the move to `optadvisor.kernels`, installing both overwrote one with the other, and
bitsandbytes found our `kernels` and printed a load failure. Here a fresh virtual environment gets the wheel
built from this checkout: nothing top-level named `kernels` or `advisor` comes with it; then Hugging Face's
`kernels` from PyPI beside it: both import and work, and `pip check` is clean. torch and the other
dependencies are borrowed from the running environment (a .pth line), so nothing large is downloaded.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(args, **kw):
    return subprocess.run(args, capture_output=True, text=True, timeout=600, **kw)


def _pip(python: Path) -> list[str]:
    return [sys.executable, "-m", "pip", "--python", str(python)]


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    base = tmp_path_factory.mktemp("install")
    built = _run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                  "-w", str(base / "dist")])
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (base / "dist").glob("optadvisor-*.whl")
    env_dir = base / "venv"
    # no pip or setuptools of its own (ensurepip's older setuptools would shadow the borrowed one that torch
    # requires): this environment's pip installs into it (--python)
    assert _run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)]).returncode == 0
    python = env_dir / "bin" / "python"
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    # the running environment's packages (torch, pydantic, ...) after the fresh one's own
    Path(purelib, "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # --ignore-installed: the borrowed environment has optadvisor too (this checkout's), which pip would take
    # as "already satisfied" and install nothing here
    installed = _run([*_pip(python), "install", "--no-deps", "--ignore-installed", "-q", str(wheel)])
    assert installed.returncode == 0, installed.stderr[-2000:]
    return python, Path(purelib)


SMOKE = """
import torch
from optadvisor import kernels, advise
p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.ones(3)
kernels.AdamW([p], lr=0.1).step()
assert float(p.sum()) < 3, p
assert advise(task="regression", n_samples=100).optimizer.name
import optadvisor
print("optadvisor ok", kernels.__name__, optadvisor.__file__)
"""


def test_the_wheel_installs_no_top_level_kernels_or_advisor(venv):
    python, purelib = venv
    assert not (purelib / "kernels").exists() and not (purelib / "advisor").exists()
    assert (purelib / "optadvisor" / "kernels" / "_runtime" / "native.c").exists()
    assert (purelib / "optadvisor" / "advisor" / "rules" / "optimizers.yaml").exists()
    # what bitsandbytes' CPU backend runs at import: it must not find our package any more — no top-level
    # `kernels` at all, or Hugging Face's (transformers, a test dependency, installs it), never ours
    probe = _run([str(python), "-c", "import importlib.util as u; s = u.find_spec('kernels'); "
                  "print(s.origin if s else 'none')"], cwd=purelib.parent)
    origin = probe.stdout.strip()
    ours = str(ROOT / "kernels" / "__init__.py")
    assert probe.returncode == 0 and "optadvisor" not in origin and origin != ours, origin
    get_kernel = _run([str(python), "-c", "from kernels import get_kernel"], cwd=purelib.parent)
    if origin == "none":
        assert get_kernel.returncode != 0 and "No module named 'kernels'" in get_kernel.stderr, get_kernel.stderr
    else:
        assert get_kernel.returncode == 0, get_kernel.stderr[-2000:]
    smoke = _run([str(python), "-c", SMOKE], cwd=purelib.parent)
    assert smoke.returncode == 0 and "optadvisor ok optadvisor.kernels" in smoke.stdout, smoke.stderr[-2000:]
    assert f"{purelib}/optadvisor/__init__.py" in smoke.stdout  # the wheel's, not the borrowed one


def test_hugging_faces_kernels_installs_beside_it(venv):
    python, purelib = venv
    hf = _run([*_pip(python), "install", "-q", "kernels"])
    if hf.returncode != 0 and ("Could not find a version" in hf.stderr or "connection" in hf.stderr.lower()):
        pytest.skip(f"Hugging Face's kernels could not be fetched from the package index: {hf.stderr[-300:]}")
    assert hf.returncode == 0, hf.stderr[-2000:]
    both = _run([str(python), "-c", "import kernels; assert callable(kernels.get_kernel), kernels.__file__\n"
                 + SMOKE], cwd=purelib.parent, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert both.returncode == 0 and "optadvisor ok" in both.stdout, both.stderr[-2000:]
    check = _run([*_pip(python), "check"])
    assert check.returncode == 0, check.stdout + check.stderr
