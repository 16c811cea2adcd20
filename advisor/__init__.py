"""optadvisor's advisor: which optimizer, which loss, which hyperparameters — and why.

>>> from advisor import advise
>>> rec = advise(task="regression", n_samples=2_000, n_features=8, target_outlier_fraction=0.12)
>>> rec.loss.name, rec.optimizer.name
('HuberLoss', 'Adam')
>>> print(rec.explain())   # the rules that fired, on which facts, their sources, what lost and why
"""

from ._engine import Alternative, Choice, Note, Reason, Recommendation, Unknown, advise, evaluate
from ._expr import RuleError
from ._profile import TaskProfile
from ._rules import Rule, RuleFile, RuleSet, builtin_rule_files, load_rules, rule_file_schema

__all__ = [
    "Alternative",
    "Choice",
    "Note",
    "Reason",
    "Recommendation",
    "Rule",
    "RuleError",
    "RuleFile",
    "RuleSet",
    "TaskProfile",
    "Unknown",
    "advise",
    "builtin_rule_files",
    "evaluate",
    "load_rules",
    "rule_file_schema",
]
