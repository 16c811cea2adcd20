"""optadvisor: which optimizer, which loss, which learning rate — and why.

One import namespace for both halves of the project:

>>> from optadvisor import kernels                  # fused, from-scratch drop-ins for torch.optim / torch.nn
>>> opt = kernels.AdamW(model.parameters(), lr=1e-3)
>>> from optadvisor import advise, TaskProfile      # the advisor (also: from optadvisor.advisor import ...)
>>> rec = advise(task="regression", n_samples=2_000, n_features=8)

``optadvisor.kernels`` imports torch only; ``optadvisor.advisor`` (pydantic, PyYAML) is imported the first time
one of its names is asked for here.
"""

import os as _os

# Installed, the subpackages live in this folder. In a source checkout they are the repository's top-level
# folders (kernels/, advisor/, and rules/ found by the advisor itself): this package then reaches them there,
# so that `python -m benchmarks` or a test run from the repository root imports the same code.
_here = _os.path.dirname(_os.path.abspath(__file__))
_root = _os.path.dirname(_here)
if not _os.path.isdir(_os.path.join(_here, "kernels")) and _os.path.isfile(_os.path.join(_root, "kernels",
                                                                                           "__init__.py")):
    __path__.append(_root)  # noqa: F821 - a package's own __path__

_ADVISOR_NAMES = (
    "advise", "evaluate", "TaskProfile", "Recommendation", "Choice", "Reason", "Alternative", "Note", "Unknown",
    "load_rules", "RuleSet", "Rule", "RuleFile", "RuleError", "rule_file_schema", "builtin_rule_files",
    "profile_data", "DataProfile", "TrainingMonitor", "diagnose", "Diagnosis", "Finding", "lr_range_test",
    "LRRangeResult", "trial", "TrialResult", "CandidateResult",
)
__all__ = ["kernels", "advisor", *_ADVISOR_NAMES]


def __getattr__(name: str):
    import importlib

    if name in ("kernels", "advisor"):
        return importlib.import_module(f"{__name__}.{name}")
    if name in _ADVISOR_NAMES:
        return getattr(importlib.import_module(f"{__name__}.advisor"), name)
    raise AttributeError(f"module 'optadvisor' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
