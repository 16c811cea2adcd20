"""``advise``: the advisor on the command line.

    advise --task classification --n-samples 50000 --n-classes 10 --class-imbalance 20
    advise --profile facts.yaml --json
    advise --example                     # a built-in regression example with outliers
    advise rules list | check FILE... | schema
    advise profile DATA.(csv|npz|pt) --target COLUMN      # profile the data, then advise
    advise diagnose HISTORY.(csv|json)                     # what the training curves show
    advise trial DATA --target COL | --example digits [--storage URL]   # search around the advice on a validation split

Exit codes: 0 ok, 2 bad input (invalid facts, rule errors, failing rule examples).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ._engine import evaluate
from ._expr import RuleError
from ._profile import TaskProfile
from ._rules import load_rules, rule_file_schema
from ._yaml import InputError, load_yaml, read_text

EXAMPLE = {"task": "regression", "n_samples": 2000, "n_features": 8, "target_outlier_fraction": 0.12,
           "target_scale": 3.5, "model_kind": "mlp", "n_params": 5000, "batch_size": 64, "tuning_budget": 5}


def _fact_flags(parser: argparse.ArgumentParser) -> None:
    for name, field in TaskProfile.model_fields.items():
        flag = "--" + name.replace("_", "-")
        ann = str(field.annotation)
        if "bool" in ann:
            parser.add_argument(flag, dest=name, type=_bool, metavar="{true,false}", help=field.description)
        elif "list" in ann:
            parser.add_argument(flag, dest=name, type=lambda s: [int(x) for x in s.split(",")],
                                metavar="N,N,...", help=field.description)
        elif "Literal" in ann:
            choices = list(field.annotation.__args__) if name == "task" else [
                a for a in field.annotation.__args__[0].__args__]
            parser.add_argument(flag, dest=name, choices=choices, help=field.description)
        else:
            parser.add_argument(flag, dest=name, type=float if "float" in ann else int, help=field.description)


def _bool(s: str) -> bool:
    if s.lower() in ("true", "yes", "1"):
        return True
    if s.lower() in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def _advise(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="advise", description="Recommend an optimizer and a loss, with reasons.",
                                 epilog="Subcommands: advise rules list | check FILE... | schema; advise profile DATA "
                                        "--target COLUMN; advise diagnose HISTORY; advise trial DATA --target "
                                        "COLUMN (or --example NAME): search around the advice on a validation "
                                        "split")
    _fact_flags(ap)
    ap.add_argument("--profile", type=Path, help="read facts from a YAML or JSON file (flags override it)")
    ap.add_argument("--example", action="store_true", help="advise on a built-in example task")
    ap.add_argument("--rules", type=Path, nargs="+", help="rule files replacing the built-in rulebook")
    ap.add_argument("--extra-rules", type=Path, nargs="+", help="rule files added on top (same id overrides)")
    ap.add_argument("--json", action="store_true", help="print the recommendation as JSON")
    args = ap.parse_args(argv)
    facts: dict[str, Any] = dict(EXAMPLE) if args.example else {}
    if args.profile:
        try:
            loaded, _ = load_yaml(read_text(args.profile, "facts file"), str(args.profile))
        except InputError as exc:
            return _fail(str(exc))
        if not isinstance(loaded, dict):
            return _fail(f"{args.profile}: expected a mapping of facts")
        bad_keys = [k for k in loaded if not isinstance(k, str)]
        if bad_keys:
            return _fail(f"{args.profile}: fact names must be strings (got {bad_keys[0]!r})")
        facts.update(loaded)
    facts.update({k: v for k, v in vars(args).items() if k in TaskProfile.model_fields and v is not None})
    if "task" not in facts:
        return _fail("give --task (regression or classification), --profile FILE or --example")
    try:
        profile = TaskProfile(**facts)
    except ValidationError as exc:
        return _fail("invalid facts: " + "; ".join(f"{'.'.join(map(str, e['loc'])) or 'facts'}: {e['msg']}"
                                                   for e in exc.errors()))
    try:
        ruleset = load_rules(args.rules, args.extra_rules)
        rec = evaluate(ruleset, profile)
    except RuleError as exc:
        return _fail(str(exc))
    print(rec.model_dump_json(indent=2) if args.json else rec.explain())
    return 0


def _rules(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="advise rules")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the rules in use, with priorities and sources")
    check = sub.add_parser("check", help="validate rule files and run their examples")
    check.add_argument("files", type=Path, nargs="+")
    check.add_argument("--extra", action="store_true", help="(the default) check them as extra rules over the "
                       "built-in book, with every check --extra-rules makes")
    check.add_argument("--alone", action="store_true", help="check them as a rule book of their own, without the "
                       "built-in one")
    sub.add_parser("schema", help="the JSON Schema of a rule file")
    args = ap.parse_args(argv)
    if args.command == "schema":
        print(json.dumps(rule_file_schema(), indent=2))
        return 0
    try:
        if args.command == "list":
            ruleset = load_rules()
            for r in ruleset:
                print(f"{r.id:34s} priority {r.rule.priority:>3}  {r.rule.description}  [{r.origin}]")
            return 0
        # by default exactly what `advise --extra-rules FILE` will load: a policy file that passes here
        # loads there (it used to be checked alone, and a conflict with a built-in rule surfaced only then)
        ruleset = load_rules(args.files) if args.alone else load_rules(None, args.files)
        failures = check_examples(ruleset)
    except RuleError as exc:
        return _fail(str(exc))
    for f in failures:
        print(f, file=sys.stderr)
    n_examples = sum(len(r.rule.examples) for r in ruleset)
    print(f"{len(ruleset)} rules, {n_examples} examples: {'FAILED' if failures else 'ok'}")
    return 2 if failures else 0


def check_examples(ruleset) -> list[str]:
    """Run every example's ``expect`` (the whole rule set's advice) against ``ruleset``; the ``fires``
    part already ran at load. Returns one message per failure."""
    failures = []
    for rule in ruleset:
        for i, example in enumerate(rule.rule.examples, 1):
            if not example.expect:
                continue
            rec = evaluate(ruleset, TaskProfile(**example.facts))
            got = {"optimizer": rec.optimizer.name, "loss": rec.loss.name}
            for key, want in example.expect.items():
                if got[key] != want:
                    failures.append(f"{rule.origin}: rule {rule.id}: example {i} expects {key} {want}, "
                                    f"the rule set gives {got[key]} for {example.facts}")
    return failures


def _fail(message: str) -> int:
    print(f"advise: error: {message}", file=sys.stderr)
    return 2


_MISSING = frozenset({"", "na", "n/a", "nan", "null", "none"})  # cells read as missing values (NaN)


def _delimiter(path: Path, text: str) -> str:
    """The CSV's delimiter: a comma unless the header line has none and one of ``;``, tab or ``|`` splits it
    into the same number of cells on the first lines (a semicolon-separated file was read as one column named
    'sqft;rooms;age;price'). csv.Sniffer guesses from the first lines; its guess is kept only if it is one of
    those and it splits the header."""
    import csv

    head = text[:64 * 1024]
    first = head.split("\n", 1)[0]
    if "," in first:
        return ","
    try:
        found = csv.Sniffer().sniff(head, delimiters=";\t|").delimiter
    except csv.Error:
        found = None
    if found and found in first:
        return found
    for other in (";", "\t", "|"):
        if other in first:
            raise ValueError(f"{path}: the header has no comma but contains {other!r}; cannot tell whether "
                             f"{other!r} separates the columns (the rows disagree on how many cells it gives)")
    return ","


def _load_csv(path: Path, target: str | None):
    """(X, y) from a CSV with a header row. Empty cells (and NA, N/A, NaN, null, None) are missing values:
    NaN, which ``profile_data`` counts and reports. A target column with any non-numeric value other than a
    missing one holds class names, encoded by their rank in sorted order."""
    import csv

    import numpy as np

    text = read_text(path, "CSV file")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=_delimiter(path, text))
    rows, lines = [], []
    try:
        for r in reader:
            if r:  # blank lines are skipped
                rows.append(r)
                lines.append(reader.line_num)
    except csv.Error as exc:
        raise ValueError(f"{path}:{reader.line_num}: malformed CSV: {exc}") from None
    if len(rows) < 2:
        raise ValueError(f"{path}: needs a header row and at least one data row")
    header, body = rows[0], rows[1:]
    if target is None or target not in header:
        raise ValueError(f"{path}: --target must name one of the columns {header}")
    for r, line in zip(body, lines[1:]):
        if len(r) != len(header):
            raise ValueError(f"{path}:{line}: this row has {len(r)} cells, the header has {len(header)}")
    t = header.index(target)

    def number(v: str, line: int, col: str) -> float:
        if v.strip().lower() in _MISSING:
            return float("nan")
        try:
            return float(v)
        except ValueError:
            raise ValueError(f"{path}:{line}: column {col!r}: {v!r} is not a number (feature columns must be "
                             "numeric)") from None

    X = np.array([[number(v, line, header[j]) for j, v in enumerate(r) if j != t] for r, line in zip(body, lines[1:])],
                 dtype=np.float64).reshape(len(body), len(header) - 1)
    raw = [r[t].strip() for r in body]
    present = [v for v in raw if v.lower() not in _MISSING]
    try:  # one pass: the first non-numeric value makes the column class names
        y = np.array([float("nan") if v.lower() in _MISSING else float(v) for v in raw])
    except ValueError:
        labels = {v: i for i, v in enumerate(sorted(set(present)))}  # class names, encoded in sorted order
        y = np.array([labels.get(v, float("nan")) for v in raw], dtype=np.float64)
    return X, y


def _read_binary(path: Path, read):
    """``read()``, with any failure of numpy's or torch's readers (OSError, ValueError, BadZipFile,
    UnpicklingError, RuntimeError, EOFError, ...) turned into a ValueError naming the file: to the command
    line, a file it cannot read is bad input, whatever the reader raises."""
    try:
        return read()
    except Exception as exc:  # noqa: BLE001 - the readers raise many unrelated types for a damaged file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path}: cannot read this file: {first}") from None


def _load_table(path: Path, target: str | None):
    """(X, y) from a CSV (header row; the target column by name), an .npz (arrays X and y, or --target) or a
    .pt file (a dict with X and y, or a pair)."""
    import numpy as np
    import torch

    if path.suffix == ".csv":
        return _load_csv(path, target)
    if path.suffix == ".npz":
        data = _read_binary(path, lambda: np.load(path))
        key = target or "y"
        if not hasattr(data, "files") or "X" not in data or key not in data:
            raise ValueError(f"{path}: expected arrays 'X' and '{key}' (found {list(getattr(data, 'files', []))})")
        return _read_binary(path, lambda: (data["X"], data[key]))
    if path.suffix == ".pt":
        data = _read_binary(path, lambda: torch.load(path, weights_only=True))
        if isinstance(data, dict) and "X" in data and (target or "y") in data:
            return data["X"], data[target or "y"]
        if isinstance(data, (tuple, list)) and len(data) == 2:
            return data
        raise ValueError(f"{path}: expected a dict with 'X' and 'y' or an (X, y) pair")
    raise ValueError(f"{path}: unsupported data file (use .csv, .npz or .pt)")


def _profile(argv: list[str]) -> int:
    from ._data import profile_data

    ap = argparse.ArgumentParser(prog="advise profile", description="Profile a data set, then advise.")
    ap.add_argument("data", type=Path, help="a .csv (with --target), .npz or .pt file")
    ap.add_argument("--target", help="the target column (CSV) or array name (npz/pt)")
    ap.add_argument("--task", choices=["regression", "classification"])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    try:
        X, y = _load_table(args.data, args.target)
        prof = profile_data(X, y, task=args.task)
        rec = evaluate(load_rules(), prof.facts)
    except (OSError, ValueError, TypeError, RuleError) as exc:
        return _fail(str(exc))
    if args.json:
        print(json.dumps({"profile": prof.model_dump(mode="json"), "recommendation": rec.model_dump(mode="json")},
                         indent=2))
    else:
        print(prof.explain() + "\n\n" + rec.explain())
    return 0


def _diagnose(argv: list[str]) -> int:
    from ._monitor import TrainingMonitor, diagnose

    ap = argparse.ArgumentParser(prog="advise diagnose", description="Diagnose training curves.")
    ap.add_argument("history", type=Path, help="a CSV (step,train_loss,val_loss,grad_norm,lr) or JSON list")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    try:
        d = diagnose(TrainingMonitor.load(args.history))
    except (OSError, ValueError) as exc:
        return _fail(str(exc) if str(args.history) in str(exc) else f"{args.history}: {exc}")
    print(d.model_dump_json(indent=2) if args.json else d.explain())
    return 0


def _user_task(path: Path, target: str | None, task: str | None, val_fraction: float):
    """(model_fn, train, val) for a table of the user's: the examples' protocol (split, standardization,
    class indices) and their MLP sized from the data."""
    import torch

    from ._data import profile_data
    from ._examples import MLP, split_table

    if not 0 < val_fraction < 1:
        raise ValueError(f"--val-fraction must be between 0 and 1 (got {val_fraction})")
    X, y = _load_table(path, target)
    X, y = torch.as_tensor(X), torch.as_tensor(y)
    if X.dim() != 2 or y.dim() != 1 or len(X) != len(y):
        raise ValueError(f"{path}: expected X of shape (rows, features) and y of shape (rows,) "
                         f"(got {tuple(X.shape)} and {tuple(y.shape)})")
    task = task or profile_data(X, y).facts.task
    data = split_table(X, y, task, name=str(path), val_fraction=val_fraction)
    if data["rows_dropped"]:
        print(f"{path}: {data['rows_dropped']} rows with a missing value left out", file=sys.stderr)
    n_features, outputs = data["n_features"], data["outputs"]
    return (lambda: MLP(n_features, outputs)), data["train"], data["val"]


def _trial_cmd(argv: list[str]) -> int:
    from ._data import profile_data
    from ._examples import EXAMPLES, example_task
    from ._train import METRICS
    from ._trial import trial

    ap = argparse.ArgumentParser(prog="advise trial", description="Profile a table (yours, or a built-in example), "
                                 "advise, then search around the advice on a validation split (an Optuna study) "
                                 "with an MLP n_features-64-64-outputs. Run the same command with the same "
                                 "--storage URL on several machines to share the work.")
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("data", nargs="?", type=Path, help="a .csv (header row), .npz or .pt table")
    source.add_argument("--example", choices=EXAMPLES)
    ap.add_argument("--target", help="the target column (CSV) or array (.npz); default 'y' for .npz/.pt")
    ap.add_argument("--task", choices=["regression", "classification"], help="default: inferred, as profile")
    ap.add_argument("--val-fraction", type=float, default=0.25,
                    help="rows held out for validation, by a fixed seed (default %(default)s)")
    ap.add_argument("--n-trials", type=int, default=50, help="configurations searched (default %(default)s)")
    ap.add_argument("--top-k", type=int, default=4, help="finalists judged on the fresh seeds besides the rules' "
                    "advice and the naive default (default %(default)s)")
    ap.add_argument("--budget-steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=4, help="number of seeds: the search on the first, the finalists "
                    "judged on the others (default %(default)s)")
    ap.add_argument("--metric", choices=METRICS, help="default: error rate (classification), MSE (regression)")
    ap.add_argument("--storage", help="SQLite file or Optuna storage URL (default optadvisor-trials.db)")
    ap.add_argument("--study-name")
    ap.add_argument("--plot", help="save the finalists' validation curves (PNG/SVG)")
    args = ap.parse_args(argv)
    if args.data is not None and args.data.suffix == ".csv" and not args.target:
        return _fail(f"{args.data}: --target must name the target column")
    try:
        if args.example:
            model_fn, train, val = example_task(args.example)
        else:
            model_fn, train, val = _user_task(args.data, args.target, args.task, args.val_fraction)
        facts = profile_data(*train, model=model_fn(), **({"task": args.task} if args.task else {})).facts
        # the budget the trial trains with is a fact the rules use (the learning rate falls with the epochs)
        rec = evaluate(load_rules(), facts.model_copy(update={"budget_steps": args.budget_steps, "batch_size": 64}))
        res = trial(model_fn, train, val, rec, top_k=args.top_k, budget_steps=args.budget_steps, metric=args.metric,
                    n_trials=args.n_trials, seeds=tuple(range(args.seeds)), storage=args.storage,
                    study_name=args.study_name)
    except (ImportError, ValueError, OSError, RuleError) as exc:
        return _fail(str(exc))
    w = res.winner
    print(res.table())
    print(f"\nwinner: {w.optimizer.name} (lr {w.lr:.3g}) + {w.loss.name}, train {w.best_step} steps "
          f"({w.lr_reasoning})\nstudy: {res.study_name} in {res.storage}; {res.configs_tried} configurations, "
          f"{res.pruned} pruned, {res.steps_total:,} training steps in all ({res.steps_run:,} here)")
    for f in res.failed:
        print(f"failed: {f}")
    if args.plot:
        try:
            print(f"curves: {res.plot(args.plot)}")
        except (OSError, ValueError) as exc:
            return _fail(f"--plot {args.plot}: {exc}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "rules":
        return _rules(argv[1:])
    if argv and argv[0] == "profile":
        return _profile(argv[1:])
    if argv and argv[0] == "diagnose":
        return _diagnose(argv[1:])
    if argv and argv[0] == "trial":
        return _trial_cmd(argv[1:])
    return _advise(argv)


if __name__ == "__main__":
    raise SystemExit(main())
