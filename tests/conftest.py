"""Shared fixtures and helpers. Hypothesis strategies live in tests/strategies.py."""

import json
import math
import os
import sys

import pytest
import torch
from hypothesis import settings

sys.path.insert(0, os.path.dirname(__file__))

# `python -m pytest` from the repository root puts the root first on sys.path, where our kernels/ folder (the
# source of optadvisor.kernels) would be found as a top-level `kernels` package, shadowing Hugging Face's, which
# transformers imports ("cannot import name 'CUDAProperties' from 'kernels'"). The tests import the installed
# optadvisor (pip install -e . maps it onto these folders), so the root is dropped whenever it is installed.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Under `mutmut run` the subpackages are imported by their folder names from mutmut's copy (optadvisor/__init__.py):
# the copy's root must stay first, before any other package called kernels.
if "MUTANT_UNDER_TEST" not in os.environ and any(os.path.abspath(p or os.curdir) == _ROOT for p in sys.path):
    import importlib.util

    _saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]
    if "optadvisor" not in sys.modules and importlib.util.find_spec("optadvisor") is None:
        sys.path[:] = _saved  # not installed: the checkout's own folders are all there is
    else:  # last, so that a test module run alone still finds the (not installed) benchmarks package
        sys.path.append(_ROOT)

torch.set_num_threads(min(2, torch.get_num_threads()))

# The tests prove both paths of every update, the compiled and the eager, call by call: each configuration
# compiles at its first call, as OPTADVISOR_COMPILE=sync does. The default mode (compiled in the background,
# eager meanwhile, small calls never compiled) is tested on its own in tests/test_background_compile.py.
os.environ.setdefault("OPTADVISOR_COMPILE", "sync")

# CI runs a fixed, derandomized set of examples so that a green run is reproducible; set
# HYPOTHESIS_PROFILE=explore (and EXAMPLES_SCALE=10) to search new random examples.
settings.register_profile("default", derandomize=True, deadline=None)
settings.register_profile("explore", derandomize=False, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    """Under `mutmut run`, run a mutant's covering tests fastest first.

    mutmut runs them with -x, so a mutant is killed by its first failing test; in the order mutmut passes
    them (a set's) a slow compiled test often ran first. The durations are the ones mutmut recorded in
    mutants/mutmut-stats.json (the working directory of its runs). Outside mutmut nothing changes.
    """
    if "__mutmut_" not in os.environ.get("MUTANT_UNDER_TEST", ""):
        return
    try:
        with open("mutmut-stats.json") as f:
            durations = json.load(f)["duration_by_test"]
    except (OSError, ValueError, KeyError):
        return
    # a compiled test's recorded time is a warm process's; each mutant runs in a fresh one that compiles again
    items.sort(key=lambda item: ("compiled" in item.nodeid, durations.get(item.nodeid, math.inf)))
