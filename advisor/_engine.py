"""The engine: evaluate rules over facts, add up scores, settle hyperparameters, explain.

Conflict resolution (documented in the README, same everywhere):
1. Every rule that fires adds its scores; a candidate's score is the sum.
2. The highest score wins. A tie goes to the candidate whose strongest supporting rule has the higher
   priority, then to the earlier candidate in kernels' catalog order (Adam, AdamW, SGD, RMSprop, Adagrad;
   losses in their task's order). The result is deterministic.
3. A hyperparameter set by several firing rules takes the value of the highest-priority one; two rules of
   equal priority may both set it only if one declares ``overrides`` of the other (checked at load), and
   then the overriding rule wins. Multipliers (``scale``) from every firing rule multiply the value.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, model_validator

from optadvisor.kernels import catalog

from ._expr import UNKNOWN, RuleError
from ._monitor import Diagnosis, TrainingMonitor, diagnose
from ._profile import HISTORY_FACTS, TaskProfile
from ._recipe import Recipe, RecipeSpec
from ._rules import LOSSES_FOR_TASK, OPTIMIZERS, CompiledRule, RuleSet, load_rules


class Choice(BaseModel):
    """A chosen optimizer or loss: its kernels class name, constructor arguments and score."""

    name: str
    params: dict[str, Any]
    score: float


class Reason(BaseModel):
    """A rule that fired: what it concluded, on which facts, why, and from where."""

    rule_id: str
    concluded: list[str]
    matched: dict[str, Any]
    because: str
    source: str
    priority: int


class Alternative(BaseModel):
    """A candidate that lost, with its score and why."""

    kind: str
    name: str
    score: float
    why: str


class Unknown(BaseModel):
    """A rule that could not be decided because facts are unknown, and what it would have concluded."""

    rule_id: str
    missing: list[str]
    would: list[str]


class Note(BaseModel):
    rule_id: str
    text: str


class Recommendation(BaseModel):
    """The advice: optimizer and loss with their hyperparameters, and the reasons for them."""

    facts: TaskProfile
    optimizer: Choice
    loss: Choice
    reasons: list[Reason]
    alternatives: list[Alternative]
    notes: list[Note] = Field(default_factory=list)
    unknown: list[Unknown] = Field(default_factory=list)
    diagnosis: Diagnosis | None = None
    optimizers: dict[str, Choice] = Field(
        default_factory=dict, description="every candidate optimizer (kernels' catalog order) with its settled "
                                          "hyperparameters and score (what advisor.trial builds its pairs from)")
    losses: dict[str, Choice] = Field(
        default_factory=dict, description="every candidate loss for the task, likewise")
    recipe: RecipeSpec = Field(
        default_factory=RecipeSpec, description="the training recipe around the optimizer: schedule, warmup, "
                                                "clipping, weight-decay groups, batch scaling (rules' 'recipe')")
    train_steps: int | None = Field(
        default=None, description="how many optimizer steps to train (early stopping), when a trial measured it: "
                                  "the step at which the winner's mean validation metric was best")

    @model_validator(mode="before")
    @classmethod
    def _from_one_candidates_dict(cls, data: Any) -> Any:
        """A recommendation saved before optimizers and losses were kept apart (one ``candidates`` dict)
        loads: each candidate goes where kernels' catalog says it belongs; an unknown name is refused."""
        if isinstance(data, dict) and "candidates" in data and "optimizers" not in data and "losses" not in data:
            data = dict(data)
            split: dict[str, dict[str, Any]] = {"optimizer": {}, "loss": {}}
            for name, choice in data.pop("candidates").items():
                try:
                    kind = catalog.entry(name).kind
                except KeyError as exc:
                    raise ValueError(f"candidates: {exc.args[0]}") from None
                split[kind][name] = choice
            data["optimizers"], data["losses"] = split["optimizer"], split["loss"]
        return data

    @property
    def candidates(self) -> dict[str, Choice]:
        """Every candidate by name, optimizers then losses (the names never clash): a lookup, not stored."""
        return {**self.optimizers, **self.losses}

    def build_optimizer(self, params: Any, choice: Choice | None = None, **overrides: Any):
        """The recommended ``kernels`` optimizer over ``params`` (e.g. ``model.parameters()``); ``choice``
        picks another candidate, ``overrides`` replace hyperparameters (e.g. ``lr=...``)."""
        return build_optimizer(choice or self.optimizer, params, **overrides)

    def build(self, model: Any, total_steps: int, batch_size: int | None = None, **overrides: Any) -> Recipe:
        """The whole recipe as ready objects: ``.optimizer`` (the recommended ``kernels`` optimizer over
        ``model``'s trainable parameters in the advised weight-decay groups), ``.scheduler`` (a
        ``torch.optim.lr_scheduler.LRScheduler``: call ``scheduler.step()`` after every ``optimizer.step()``),
        ``.loss`` (the loss module) and ``.max_grad_norm`` (clip at it, or None; ``recipe.clip()`` does it).
        ``batch_size``: the batch you will train with, when it is not the one advised for (the learning rate
        follows ``recipe.batch_scaling``); ``overrides`` replace optimizer hyperparameters (``lr=...``)."""
        from ._recipe import build
        return build(self, model, total_steps, batch_size, **overrides)

    def for_hf_trainer(self, model: Any, num_training_steps: int, **overrides: Any):
        """``(optimizer, scheduler)`` for Hugging Face's ``Trainer(model, args, optimizers=...)``: those of
        ``build(model, num_training_steps)``. The Trainer clips gradients at ``args.max_grad_norm`` (1.0 by
        default) whatever the optimizer: set it to ``recipe.max_grad_norm``, or 0 for none."""
        from ._integrations import for_hf_trainer
        return for_hf_trainer(self, model, num_training_steps, **overrides)

    def lightning_optimizers(self, model: Any, total_steps: int, **overrides: Any) -> dict[str, Any]:
        """What ``LightningModule.configure_optimizers`` returns: ``{"optimizer": ..., "lr_scheduler":
        {"scheduler": ..., "interval": "step", "frequency": 1}}``, those of ``build(model, total_steps)``
        (clipping: ``Trainer(gradient_clip_val=rec.recipe.max_grad_norm)``)."""
        from ._integrations import lightning_optimizers
        return lightning_optimizers(self, model, total_steps, **overrides)

    def build_loss(self, choice: Choice | None = None):
        """The recommended ``kernels`` loss module (e.g. ``kernels.HuberLoss(delta=...)``)."""
        return build_loss(choice or self.loss)

    def explain(self) -> str:
        """A readable, deterministic multi-line explanation."""
        facts = ", ".join(f"{k}={_fmt(v)}" for k, v in self.facts.known().items())
        lines = [f"Advice for: {facts}", ""]
        if self.diagnosis is not None:
            lines += [self.diagnosis.explain(), ""]
        lines += [
                 f"  optimizer  {_call(self.optimizer)}   (score {_fmt(self.optimizer.score)})",
                 f"  loss       {_call(self.loss)}   (score {_fmt(self.loss.score)})"]
        lines.append(f"  recipe     {self.recipe.describe()}")
        if self.train_steps is not None:
            lines.append(f"  train for  {self.train_steps} steps (early stopping, measured by a trial)")
        lines += ["", "Why (rules that fired):"]
        chosen = (self.optimizer.name, self.loss.name, "recipe")
        for i, r in enumerate(self.reasons, 1):
            matched = ", ".join(f"{k}={_fmt(v)}" for k, v in r.matched.items()) or "always"
            # hyperparameters of candidates that were not chosen are in r.concluded, not worth a line here
            shown = [c for c in r.concluded if "." not in c.split(" ")[0] or c.split(".")[0] in chosen]
            lines.append(f"  {i}. [{r.rule_id}] {'; '.join(shown) or 'nothing for the chosen pair'}   <- {matched}")
            lines.append(f"     because: {r.because}")
            lines.append(f"     source:  {r.source}")
        if self.alternatives:
            lines += ["", "Alternatives:"]
            lines += [f"  - {a.kind} {a.name} (score {_fmt(a.score)}): {a.why}" for a in self.alternatives]
        if self.notes:
            lines += ["", "Notes:"]
            lines += [f"  - {n.text} [{n.rule_id}]" for n in self.notes]
        if self.unknown:
            lines += ["", "Unknown facts that could change this advice:"]
            lines += [f"  - {', '.join(u.missing)}: rule {u.rule_id} would conclude {'; '.join(u.would)}"
                      for u in self.unknown]
        return "\n".join(lines)


def optimizer_arguments(choice: Choice, **overrides: Any) -> dict[str, Any]:
    """The choice's constructor arguments with ``overrides`` on top, coerced to the types the optimizer takes
    (lists to tuples, ...), through kernels' catalog."""
    entry = _entry(choice.name, "optimizer")
    return {k: entry.params[k].coerce(v) if k in entry.params else v for k, v in {**choice.params, **overrides}.items()}


def build_optimizer(choice: Choice, params: Any, **overrides: Any):
    """A ``kernels`` optimizer from a Choice (name and constructor arguments), through kernels' catalog."""
    return _entry(choice.name, "optimizer").cls(params, **optimizer_arguments(choice, **overrides))


def build_loss(choice: Choice):
    """A ``kernels`` loss module from a Choice, through kernels' catalog."""
    entry = _entry(choice.name, "loss")
    return entry.cls(**{k: entry.params[k].coerce(v) if k in entry.params else v for k, v in choice.params.items()})


def _entry(name: str, kind: str):
    e = catalog.entry(name)
    if e.kind != kind:
        raise ValueError(f"{name} is {_a(e.kind)}, not {_a(kind)}")
    return e


def _a(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def _call(choice: Choice) -> str:
    return f"{choice.name}(" + ", ".join(f"{k}={_fmt(v)}" for k, v in choice.params.items()) + ")"


@functools.lru_cache(maxsize=1)
def _builtin() -> RuleSet:
    return load_rules()


def _as_paths(paths: Iterable[str | Path] | str | Path | None) -> tuple[Path, ...] | None:
    if paths is None:
        return None
    if isinstance(paths, (str, Path)):
        paths = [paths]
    return tuple(Path(p) for p in paths)


def advise(profile: TaskProfile | dict[str, Any] | Any | None = None, *,
           rules: Iterable[str | Path] | RuleSet | None = None, extra_rules: Iterable[str | Path] | None = None,
           history: TrainingMonitor | Iterable[dict[str, float]] | None = None, **facts: Any) -> Recommendation:
    """Recommend an optimizer and a loss, with hyperparameters and reasons.

    ``advise(task="regression", n_samples=2000, target_outlier_fraction=0.12)`` or
    ``advise(TaskProfile(...))`` or ``advise(profile_data(X, y))``. ``rules=[paths]`` replaces the built-in
    rulebook, ``extra_rules=[paths]`` adds to it (same id overrides, ``enabled: false`` disables).
    ``history`` (a TrainingMonitor or its records) is diagnosed and its facts join the profile's.

    Example::

        >>> rec = advise(task="regression", n_samples=2_000, target_outlier_fraction=0.12)
        >>> rec.loss.name
        'HuberLoss'
    """
    if profile is None:
        profile = TaskProfile(**facts)
    elif facts:
        raise TypeError("pass either a TaskProfile/dict or facts as keyword arguments, not both")
    elif isinstance(profile, dict):
        profile = TaskProfile(**profile)
    elif not isinstance(profile, TaskProfile) and isinstance(getattr(profile, "facts", None), TaskProfile):
        profile = profile.facts  # a DataProfile from profile_data
    if not isinstance(profile, TaskProfile):
        raise TypeError(f"advise: expected a TaskProfile, a dict of facts or a DataProfile (got "
                        f"{type(profile).__name__})")
    diagnosis = None
    if history is not None:
        diagnosis = diagnose(history)
        profile = TaskProfile(**{**profile.model_dump(), **diagnosis.facts})
    if isinstance(rules, RuleSet):
        if extra_rules:
            raise TypeError("extra_rules needs rule files, not a loaded RuleSet, in 'rules'")
        ruleset = rules
    elif rules is None and extra_rules is None:
        ruleset = _builtin()
    else:
        ruleset = load_rules(_as_paths(rules), _as_paths(extra_rules))
    rec = evaluate(ruleset, profile)
    if diagnosis is not None:
        rec.diagnosis = diagnosis
    return rec


def evaluate(ruleset: RuleSet, profile: TaskProfile) -> Recommendation:
    """Apply a loaded rule set to a profile (``advise`` without the loading)."""
    facts = profile.model_dump()
    scores: dict[str, dict[str, float]] = {"optimizer": {}, "loss": {}}
    support: dict[str, list[tuple[str, float, int]]] = {}
    values: dict[tuple[str, str], tuple[Any, CompiledRule]] = {}
    scales: dict[tuple[str, str], float] = {}
    reasons, notes, unknown = [], [], []
    for rule in ruleset:
        outcome = rule.evaluate(facts)
        then = rule.rule.then
        if outcome is UNKNOWN:
            would = _conclusions(rule, facts, evaluate_values=False)
            # facts read off training curves are unknown whenever no history was given: not worth listing
            missing = sorted(f for f in rule.facts if facts.get(f) is None and f not in HISTORY_FACTS)
            if missing and (then.optimizer or then.loss or then.params or then.scale):
                unknown.append(Unknown(rule_id=rule.id, missing=missing, would=would))
            continue
        if outcome is not True:
            continue
        for kind in ("optimizer", "loss"):
            for name, delta in getattr(then, kind).items():
                scores[kind][name] = scores[kind].get(name, 0.0) + delta
                support.setdefault(name, []).append((rule.id, delta, rule.rule.priority))
        for cand, ps in rule.params.items():
            for pname, fn in ps.items():
                value = fn(facts)
                if value is UNKNOWN:
                    continue
                held = values.get((cand, pname))
                if held is None or _beats(rule, held[1]):
                    values[(cand, pname)] = (value, rule)
        for cand, ps in rule.scale.items():
            for pname, fn in ps.items():
                factor = fn(facts)
                if factor is not UNKNOWN:
                    scales[(cand, pname)] = scales.get((cand, pname), 1.0) * factor
        reasons.append(Reason(rule_id=rule.id, concluded=_conclusions(rule, facts), because=rule.rule.because,
                              source=rule.rule.source, priority=rule.rule.priority,
                              matched={f: facts[f] for f in sorted(rule.facts) if facts.get(f) is not None}))
        notes += [Note(rule_id=rule.id, text=t) for t in then.notes]

    def pick(kind: str, candidates: tuple[str, ...]) -> tuple[str, list[Alternative]]:
        def key(name: str):
            top = max((p for _, d, p in support.get(name, []) if d > 0), default=-10**9)
            return (-scores[kind].get(name, 0.0), -top, candidates.index(name))
        ranked = sorted(candidates, key=key)
        winner = ranked[0]
        best = scores[kind].get(winner, 0.0)
        alternatives = []
        for name in ranked[1:]:
            s = scores[kind].get(name, 0.0)
            pro = ", ".join(f"{rid} {d:+g}" for rid, d, _ in support.get(name, [])) or "no rule supports it"
            why = (f"tied with {winner} at {_fmt(best)}; {winner} has the higher-priority support" if s == best
                   else f"{_fmt(best - s)} below {winner}")
            alternatives.append(Alternative(kind=kind, name=name, score=s, why=f"{why} (for it: {pro})"))
        return winner, alternatives

    opt, opt_alts = pick("optimizer", OPTIMIZERS)
    loss, loss_alts = pick("loss", LOSSES_FOR_TASK[profile.task])

    def own(cand: str) -> dict[str, Any]:
        out = {}
        for (c, pname), (value, _) in sorted(values.items()):
            if c == cand:
                factor = scales.get((c, pname))
                out[pname] = value * factor if factor is not None and not isinstance(value, (bool, list)) else value
        return out

    def settle(cand: str) -> dict[str, Any]:
        """The candidate's hyperparameters: those rules set for it, then those set for its float32 twin
        (AdamW for AdamW8bit) that it takes too — a rule that picks AdamW8bit for memory must not drop the
        learning rate the rules chose for AdamW."""
        out = own(cand)
        twin = _twin(cand)
        if twin is not None:
            accepted = catalog.entry(cand).params
            out.update({k: v for k, v in own(twin).items() if k not in out and k in accepted})
        return out

    optimizers, losses = ({name: Choice(name=name, params=settle(name), score=scores[kind].get(name, 0.0))
                           for name in names}
                          for kind, names in (("optimizer", OPTIMIZERS), ("loss", LOSSES_FOR_TASK[profile.task])))
    recipe_values = own("recipe")
    try:
        recipe = RecipeSpec(**recipe_values)
    except ValueError as exc:
        setters = sorted({r.id for (c, _), (_, r) in values.items() if c == "recipe"})
        raise RuleError(f"the recipe set by rule(s) {', '.join(setters)} is invalid for these facts "
                        f"({recipe_values}): {exc}") from None
    return Recommendation(
        facts=profile, optimizer=optimizers[opt], loss=losses[loss], reasons=reasons,
        alternatives=opt_alts + loss_alts, notes=notes, unknown=unknown, optimizers=optimizers, losses=losses,
        recipe=recipe)


@functools.lru_cache(maxsize=None)
def _twin(name: str) -> str | None:
    """The catalog optimizer that is ``name``'s float32 form (the same torch counterpart, named after it):
    AdamW for AdamW8bit, SGD for SGD8bit; None for an optimizer that is its own."""
    e = catalog.entry(name)
    twin = e.torch.rpartition(".")[2] if e.torch else None
    if twin is None or twin == name or twin not in {o.name for o in catalog.optimizers()}:
        return None
    return twin


def _beats(challenger: CompiledRule, holder: CompiledRule) -> bool:
    if challenger.rule.priority != holder.rule.priority:
        return challenger.rule.priority > holder.rule.priority
    return holder.id in challenger.rule.overridden


def _conclusions(rule: CompiledRule, facts: dict[str, Any], evaluate_values: bool = True) -> list[str]:
    then = rule.rule.then
    out = [f"{name} {delta:+g}" for name, delta in {**then.optimizer, **then.loss}.items()]
    for cand, ps in then.params.items():
        for pname, raw in ps.items():
            value = rule.params[cand][pname](facts) if evaluate_values else UNKNOWN
            shown = _fmt(value) if value is not UNKNOWN else str(raw).lstrip("=")
            out.append(f"{cand}.{pname} = {shown}")
    for cand, ps in then.scale.items():
        for pname, raw in ps.items():
            factor = rule.scale[cand][pname](facts) if evaluate_values else UNKNOWN
            out.append(f"{cand}.{pname} x {_fmt(factor) if factor is not UNKNOWN else str(raw).lstrip('=')}")
    if then.notes and not out:
        out.append("a note")
    return out
