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
    if "MUTANT_UNDER_TEST" in _os.environ:
        # under `mutmut run` (mutation testing of the checkout, README "Tests"): mutmut names a mutant after its
        # file's path (advisor._select.x_choose) and activates it only in a module of that name, so the
        # subpackages are imported under their folder names and optadvisor.advisor... made the same module
        # objects (not copies): one meta-path finder, only in this mode
        import importlib as _importlib
        import importlib.abc as _abc
        import importlib.util as _util
        import sys as _sys

        class _FolderNames(_abc.MetaPathFinder, _abc.Loader):
            def find_spec(self, fullname, path=None, target=None):
                if fullname.startswith(("optadvisor.advisor", "optadvisor.kernels")):
                    return _util.spec_from_loader(fullname, self)
                return None

            def create_module(self, spec):
                return _importlib.import_module(spec.name[len("optadvisor."):])

            def exec_module(self, module):
                pass

        _sys.meta_path.insert(0, _FolderNames())

_ADVISOR_NAMES = (
    "advise", "evaluate", "TaskProfile", "Recommendation", "Choice", "Reason", "Alternative", "Note", "Unknown",
    "load_rules", "RuleSet", "Rule", "RuleFile", "RuleError", "rule_file_schema", "builtin_rule_files",
    "profile_data", "DataProfile", "TrainingMonitor", "diagnose", "Diagnosis", "Finding", "lr_range_test",
    "LRRangeResult", "trial", "TrialResult", "CandidateResult",
)
_KERNELS_NAMES = ("create_optimizer", "list_optimizers")
__all__ = ["kernels", "advisor", *_KERNELS_NAMES, *_ADVISOR_NAMES]


def __getattr__(name: str):
    import importlib

    if name in ("kernels", "advisor"):
        return importlib.import_module(f"{__name__}.{name}")
    if name in _KERNELS_NAMES:
        return getattr(importlib.import_module(f"{__name__}.kernels"), name)
    if name in _ADVISOR_NAMES:
        return getattr(importlib.import_module(f"{__name__}.advisor"), name)
    raise AttributeError(f"module 'optadvisor' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
