"""Shared fixtures and helpers. Hypothesis strategies live in tests/strategies.py."""

import os
import sys

import pytest
import torch
from hypothesis import settings

sys.path.insert(0, os.path.dirname(__file__))

torch.set_num_threads(min(2, torch.get_num_threads()))

# CI runs a fixed, derandomized set of examples so that a green run is reproducible; set
# HYPOTHESIS_PROFILE=explore (and EXAMPLES_SCALE=10) to search new random examples.
settings.register_profile("default", derandomize=True, deadline=None)
settings.register_profile("explore", derandomize=False, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
