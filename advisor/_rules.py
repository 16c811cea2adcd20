"""The rule language: pydantic models for rules/*.yaml, and a loader that validates everything or nothing.

A rule file is ``rules: [ ... ]``; each rule::

    - id: huber-for-outliers            # unique; [a-z0-9][a-z0-9._-]*
      description: Huber loss when regression targets have outliers
      when:                             # an expression, or a tree of all / any / not
        all:
          - "task == 'regression'"
          - "target_outlier_fraction > 0.05"
      then:
        loss: {HuberLoss: 5}            # score added to candidates
        optimizer: {Adam: 1}
        params: {HuberLoss: {delta: 1.0}}          # hyperparameter values; "=expr" computes from facts
        scale: {SGD: {lr: "=batch_size / 256"}}    # multipliers, applied after values
        notes: ["Standardize the targets ..."]
      because: MSE squares residuals, so a few outliers dominate its gradient ...
      source: Huber (1964); ...
      priority: 0                       # higher wins ties and hyperparameter conflicts
      enabled: true
      overrides: other-rule-id          # allowed to set the same hyperparameter at equal priority (or a list)
      examples:                         # run at load: must hold, or the file is refused
        - facts: {task: regression, target_outlier_fraction: 0.12}
          fires: true
          expect: {loss: HuberLoss}     # checked by `advise rules check` and the test suite

In ``extra_rules`` files a rule with an existing id replaces it, and ``{id: some-rule, enabled: false}``
disables it.
"""

from __future__ import annotations

import importlib.resources
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from optadvisor.kernels import catalog

from ._expr import NUMBER, NUMBERS, UNKNOWN, Expression, RuleError, combine_all, combine_any, negate
from ._profile import FACT_TYPES, TaskProfile
from ._recipe import RECIPE_PARAMS
from ._yaml import InputError, load_yaml, read_text

# Every name, hyperparameter and type below is read from kernels' catalog (kernels/_catalog.py), which reads
# the constructors' signatures: a new optimizer or loss is known to the rule language once it is registered.
OPTIMIZERS: tuple[str, ...] = tuple(e.name for e in catalog.optimizers())
OptimizerName = Literal[OPTIMIZERS]  # type: ignore[valid-type]
LossName = Literal[tuple(e.name for e in catalog.losses() if e.tasks)]  # type: ignore[valid-type]

# hyperparameters a rule may set, per candidate, with their types (the kernels constructors' arguments)
PARAMS: dict[str, dict[str, str]] = {e.name: {n: p.type for n, p in e.params.items()}
                                     for e in (*catalog.optimizers(), *catalog.losses()) if e.tasks or
                                     e.kind == "optimizer"}
# the training recipe around the optimizer (schedule, warmup, clipping, decay groups): the pseudo-candidate
# ``recipe`` (advisor/_recipe.py); "choice:a|b" hyperparameters take one of the listed words
PARAMS["recipe"] = dict(RECIPE_PARAMS)
LOSSES_FOR_TASK: dict[str, tuple[str, ...]] = {task: tuple(e.name for e in catalog.losses(task))
                                               for task in catalog.tasks()}

_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)  # a NaN score would silently never win


class AllOf(BaseModel):
    model_config = _STRICT
    all: list[Condition] = Field(min_length=1)


class AnyOf(BaseModel):
    model_config = _STRICT
    any: list[Condition] = Field(min_length=1)


class NotOf(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    not_: Condition = Field(alias="not")


Condition = Union[str, bool, AllOf, AnyOf, NotOf]  # noqa: UP007 - pydantic needs the Union for recursion
AllOf.model_rebuild()
AnyOf.model_rebuild()
NotOf.model_rebuild()

Value = Union[float, int, bool, str, list[float]]  # noqa: UP007


class Then(BaseModel):
    """What a rule concludes when it fires."""

    model_config = _STRICT
    optimizer: dict[OptimizerName, float] = Field(default_factory=dict, description="score per optimizer")
    loss: dict[LossName, float] = Field(default_factory=dict, description="score per loss")
    params: dict[str, dict[str, Value]] = Field(
        default_factory=dict, description="hyperparameter values per candidate; a string '=expr' is computed")
    scale: dict[str, dict[str, Union[float, str]]] = Field(  # noqa: UP007
        default_factory=dict, description="multipliers of number hyperparameters per candidate")
    notes: list[str] = Field(default_factory=list, description="advice that is not a choice")


class Example(BaseModel):
    """Facts, and what the rule (``fires``) and the whole rule set (``expect``) should conclude."""

    model_config = _STRICT
    facts: dict[str, Any]
    fires: bool
    expect: dict[Literal["optimizer", "loss"], str] = Field(default_factory=dict)


class Rule(BaseModel):
    """One rule of the rulebook. See the module docstring for the YAML form."""

    model_config = _STRICT
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$", max_length=80)
    description: str = Field(min_length=1)
    when: Condition
    then: Then
    because: str = Field(min_length=1)
    source: str = Field(min_length=1)
    priority: int = 0
    enabled: bool = True
    overrides: Union[str, list[str], None] = None  # noqa: UP007

    @property
    def overridden(self) -> tuple[str, ...]:
        """The ids this rule may override at its own priority (``overrides``: one id or a list)."""
        o = self.overrides
        return () if o is None else (o,) if isinstance(o, str) else tuple(o)
    examples: list[Example] = Field(min_length=1)


class Disable(BaseModel):
    """``{id: some-rule, enabled: false}`` in an extra rules file: switch a rule off."""

    model_config = _STRICT
    id: str
    enabled: Literal[False]


class RuleFile(BaseModel):
    """A rules/*.yaml file (its JSON Schema: ``advise rules schema``)."""

    model_config = _STRICT
    rules: list[Union[Rule, Disable]]  # noqa: UP007


@dataclass(frozen=True)
class CompiledRule:
    """A validated rule with its condition and parameter expressions compiled."""

    rule: Rule
    origin: str  # "file:line"
    condition: Callable[[dict], Any]
    facts: frozenset[str]
    params: dict[str, dict[str, Callable[[dict], Any]]] = field(default_factory=dict)
    scale: dict[str, dict[str, Callable[[dict], Any]]] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.rule.id

    def evaluate(self, facts: dict[str, Any]) -> Any:
        """True, False or UNKNOWN."""
        return self.condition(facts)


@dataclass(frozen=True)
class RuleSet:
    """An immutable, validated set of enabled rules, in evaluation order (priority desc, then id)."""

    rules: tuple[CompiledRule, ...]
    disabled: tuple[str, ...] = ()

    def __iter__(self):
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def get(self, rule_id: str) -> CompiledRule | None:
        return next((r for r in self.rules if r.id == rule_id), None)


def builtin_rule_files() -> list[Path]:
    """The rulebook shipped with the package (the repository's rules/, installed as ``advisor.rules``)."""
    try:
        folder = Path(str(importlib.resources.files(__name__.rpartition(".")[0] + ".rules")))
    except ModuleNotFoundError:  # advisor imported from a source checkout that is not installed
        folder = Path(__file__).resolve().parent.parent / "rules"
    files = sorted(folder.glob("*.yaml"))
    if not files:
        raise RuleError(f"the built-in rulebook is missing: no *.yaml in {folder}")
    return files


def load_rules(paths: Iterable[str | Path] | None = None,
               extra: Iterable[str | Path] | None = None) -> RuleSet:
    """Load, validate and compile rule files; all or nothing.

    ``paths``: the rule set (default: the built-in rulebook); a rule id may appear once across them.
    ``extra``: files layered on top: same id replaces, ``{id, enabled: false}`` disables, new ids add.
    Raises :class:`RuleError` naming the file, line, rule id and problem; nothing is returned half-made.
    """
    if isinstance(paths, (str, Path)):  # one file (iterated, a string would be read as paths of one character)
        paths = [paths]
    if isinstance(extra, (str, Path)):
        extra = [extra]
    base_files = [Path(p) for p in paths] if paths is not None else builtin_rule_files()
    if not base_files:
        raise RuleError("no rule files given")
    rules: dict[str, CompiledRule] = {}
    for path in base_files:
        for item in _read_file(path):
            if isinstance(item, str):
                raise RuleError(f"{path}: 'enabled: false' entries ({item}) belong in extra rule files")
            if item.id in rules:
                raise RuleError(f"{item.origin}: rule {item.id}: duplicate rule id (also at "
                                f"{rules[item.id].origin})")
            rules[item.id] = item
    disabled = []
    for path in [Path(p) for p in (extra or [])]:
        seen: set[str] = set()
        for item in _read_file(path):
            rule_id = item if isinstance(item, str) else item.id
            if rule_id in seen:
                raise RuleError(f"{path}: rule {rule_id}: duplicate rule id in this file")
            seen.add(rule_id)
            if isinstance(item, str):
                if rules.pop(item, None) is None:
                    raise RuleError(f"{path}: rule {item}: cannot disable an unknown rule")
                disabled.append(item)
            else:
                rules[rule_id] = item
    enabled = [r for r in rules.values() if r.rule.enabled]
    _check_conflicts(enabled, set(rules) | set(disabled))
    ordered = tuple(sorted(enabled, key=lambda r: (-r.rule.priority, r.id)))
    return RuleSet(ordered, tuple(sorted(disabled + [r.id for r in rules.values() if not r.rule.enabled])))


def _read_file(path: Path) -> list[CompiledRule | str]:
    try:
        data, root = load_yaml(read_text(path, "rule file"), str(path))
    except InputError as exc:
        raise RuleError(str(exc)) from None
    if not isinstance(data, dict) or not isinstance(data.get("rules"), list):
        raise RuleError(f"{path}:1: a rule file must be a mapping with a 'rules' list")
    unknown = set(data) - {"rules"}
    if unknown:
        raise RuleError(f"{path}:1: unknown top-level keys {sorted(unknown)} (only 'rules')")
    rules_node = next(v for k, v in root.value if k.value == "rules")
    out: list[CompiledRule | str] = []
    for raw, node in zip(data["rules"], rules_node.value):
        line = node.start_mark.line + 1
        rule_id = raw.get("id", "?") if isinstance(raw, dict) else "?"
        where = f"{path}:{line}"
        if isinstance(raw, dict) and raw.get("enabled") is False and set(raw) == {"id", "enabled"}:
            try:
                out.append(Disable.model_validate(raw).id)
            except ValidationError as exc:
                raise RuleError(f"{where}: rule {rule_id}: {_first_error(exc)}") from None
            continue
        try:
            rule = Rule.model_validate(raw)
        except ValidationError as exc:
            problems = [_first_error(exc, limit=None)] + _condition_errors(raw)
            raise RuleError(f"{where}: rule {rule_id}: {'; '.join(problems)}") from None
        try:
            out.append(compile_rule(rule, where))
        except RuleError as exc:
            raise RuleError(f"{where}: rule {rule.id}: {exc}") from None
    return out


def _first_error(exc: ValidationError, limit: int | None = 3) -> str:
    errors = exc.errors()
    parts = []
    for err in errors[:limit]:
        loc = ".".join(str(x) for x in err["loc"] if not str(x).startswith(("function-", "union")))
        parts.append(f"{loc or 'rule'}: {err['msg']}")
    more = f" (and {len(errors) - limit} more)" if limit is not None and len(errors) > limit else ""
    return "; ".join(parts) + more


def _condition_errors(raw: Any) -> list[str]:
    """The problems of a rule's ``when`` on its own, for a rule refused for another reason (a missing
    ``examples:`` must not hide an unknown fact in the condition): every error of a rule at once."""
    if not isinstance(raw, dict) or "when" not in raw:
        return []
    try:
        when = Rule.model_fields["when"].annotation
        from pydantic import TypeAdapter

        _compile_condition(TypeAdapter(when).validate_python(raw["when"]), set())
    except ValidationError:
        return []  # already among the model's errors
    except RuleError as exc:
        return [f"when: {exc}"]
    return []


def _compile_condition(cond: Any, facts: set[str]) -> Callable[[dict], Any]:
    if isinstance(cond, bool):
        return lambda f, v=cond: v
    if isinstance(cond, str):
        expr = Expression(cond, FACT_TYPES)
        if expr.type != "bool":
            raise RuleError(f"condition {cond!r} is a {expr.type}, not a bool")
        facts |= expr.facts
        return expr.evaluate
    if isinstance(cond, AllOf):
        return combine_all([_compile_condition(c, facts) for c in cond.all])
    if isinstance(cond, AnyOf):
        return combine_any([_compile_condition(c, facts) for c in cond.any])
    return negate(_compile_condition(cond.not_, facts))


def _compile_value(candidate: str, name: str, value: Any, *, scale: bool) -> Callable[[dict], Any]:
    if candidate not in PARAMS:
        raise RuleError(f"unknown candidate {candidate!r}; known: {', '.join(PARAMS)}")
    allowed = PARAMS[candidate]
    if name not in allowed:
        raise RuleError(f"{candidate} has no hyperparameter {name!r}; allowed: {', '.join(allowed) or 'none'}")
    if scale and allowed[name] != NUMBER:  # a multiplier on a flag or a list would be ignored: say so instead
        raise RuleError(f"{candidate}.{name} is a {allowed[name]}; only number hyperparameters can be scaled")
    expected = NUMBER if scale else allowed[name]
    if expected.startswith("choice:"):
        choices = expected[len("choice:"):].split("|")
        if value not in choices:
            raise RuleError(f"{candidate}.{name}: expected one of {', '.join(choices)}, got {value!r}")
        return lambda f, v=value: v
    if isinstance(value, str) and not value.startswith("="):
        try:  # YAML 1.1 reads 1e-3 (no dot) as a string: accept it as the number it is
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, str):
        if not value.startswith("="):
            raise RuleError(f"{candidate}.{name}: a string value must be an expression starting with '=' "
                            f"(got {value!r})")
        expr = Expression(value[1:], FACT_TYPES)
        if expr.type != expected:
            raise RuleError(f"{candidate}.{name}: expression {value!r} gives a {expr.type}, expected {expected}")
        return expr.evaluate
    kind = "bool" if isinstance(value, bool) else NUMBERS if isinstance(value, list) else NUMBER
    if kind != expected:
        raise RuleError(f"{candidate}.{name}: expected a {expected}, got {value!r}")
    if kind == NUMBER and not math.isfinite(value):
        raise RuleError(f"{candidate}.{name}: {value!r} is not a finite number")
    return lambda f, v=value: v


def compile_rule(rule: Rule, origin: str = "<memory>") -> CompiledRule:
    """Validate a rule's expressions and values against the declared facts and candidates."""
    facts: set[str] = set()
    condition = _compile_condition(rule.when, facts)
    params = {c: {n: _compile_value(c, n, v, scale=False) for n, v in ps.items()} for c, ps in rule.then.params.items()}
    scale = {c: {n: _compile_value(c, n, v, scale=True) for n, v in ps.items()} for c, ps in rule.then.scale.items()}
    compiled = CompiledRule(rule, origin, condition, frozenset(facts), params, scale)
    for i, example in enumerate(rule.examples):
        try:
            profile = TaskProfile.model_validate(example.facts)
        except ValidationError as exc:
            raise RuleError(f"example {i + 1}: invalid facts: {_first_error(exc)}") from None
        got = compiled.evaluate(profile.model_dump())
        fired = got is True
        if fired != example.fires:
            raise RuleError(f"example {i + 1} expects fires: {str(example.fires).lower()}, but the condition "
                            f"is {'unknown' if got is UNKNOWN else str(got).lower()} for {example.facts}")
    return compiled


def _check_conflicts(rules: list[CompiledRule], all_ids: set[str]) -> None:
    setters: dict[tuple[str, str], list[CompiledRule]] = {}
    for r in rules:
        for target in r.rule.overridden:
            if target not in all_ids:
                raise RuleError(f"{r.origin}: rule {r.id}: overrides unknown rule {target!r}")
        for cand, ps in r.rule.then.params.items():
            for name in ps:
                setters.setdefault((cand, name), []).append(r)
    for (cand, name), rs in setters.items():
        for i, a in enumerate(rs):
            for b in rs[i + 1:]:
                if a.rule.priority == b.rule.priority and b.id not in a.rule.overridden and a.id not in b.rule.overridden:
                    above = max(r.rule.priority for r in rs) + 1
                    raise RuleError(
                        f"{b.origin}: rule {b.id}: sets {cand}.{name}, which rule {a.id} ({a.origin}) also sets "
                        f"at the same priority {a.rule.priority}; give one a higher priority (priority {above} "
                        f"is above every rule that sets {cand}.{name}) or declare 'overrides: {a.id}'")


def rule_file_schema() -> dict[str, Any]:
    """JSON Schema of a rule file, for editors (``advise rules schema``)."""
    return RuleFile.model_json_schema()
