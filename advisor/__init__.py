"""optadvisor's advisor: which optimizer, which loss, which hyperparameters — and why.

>>> from optadvisor.advisor import advise
>>> rec = advise(task="regression", n_samples=2_000, n_features=8, target_outlier_fraction=0.12)
>>> rec.loss.name, rec.optimizer.name
('HuberLoss', 'Adam')
>>> print(rec.explain())   # the rules that fired, on which facts, their sources, what lost and why
"""

from ._data import DataProfile, ModelProfile, profile_data, profile_model
from ._engine import Alternative, Choice, Note, Reason, Recommendation, Unknown, advise, evaluate
from ._expr import RuleError
from ._lr import LRRangeResult, lr_range_test
from ._monitor import Diagnosis, Finding, TrainingMonitor, diagnose
from ._profile import TaskProfile
from ._trial import CandidateResult, TrialResult, trial
from ._rules import Rule, RuleFile, RuleSet, builtin_rule_files, load_rules, rule_file_schema

__all__ = [
    "advise", "evaluate", "TaskProfile", "Recommendation", "Choice", "Reason", "Alternative", "Note", "Unknown",
    "load_rules", "RuleSet", "Rule", "RuleFile", "RuleError", "rule_file_schema", "builtin_rule_files",
    "profile_data", "DataProfile", "profile_model", "ModelProfile", "TrainingMonitor", "diagnose", "Diagnosis",
    "Finding", "lr_range_test",
    "LRRangeResult", "trial", "TrialResult", "CandidateResult",
]
