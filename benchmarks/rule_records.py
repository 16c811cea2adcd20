"""``python -m benchmarks.rule_records``: each advice rule's measured record on the advice benchmark.

For every rule that sets an optimizer, a learning rate or a loss (scores, ``lr`` values or scales, loss
parameters), on every benchmark table where it fires: the rules-only advice *with* the rule against the advice
*without* it (the same rulebook with only that rule disabled, as an ``extra_rules`` file with
``enabled: false`` would). Where the two differ, both are judged by the protocol (the cached grid's value
when the advice is a grid point; otherwise trained on seeds 0/1/2 and cached in
``benchmarks/advice_judged.json``). A rule's record, per half: fired on N tables, changed the advice on M;
better / tie / worse than without it (2% MSE / 0.005 error), and the worst ratio. The fitting half's record is
what the rule was kept or narrowed on; the reporting half's is the check. The line to cite in the rule's
``because:`` is printed for each rule (``--half fit``'s line is the one the rulebook carries).

    python -m benchmarks.rule_records [--steps 300 --batch 64] [--out DIR] [--write]

``--write`` puts each rule's record, both halves, at the end of its ``because:`` in rules/*.yaml (replacing the
previous record); ``tests/test_advice_benchmark.py`` fails when a rule that sets an optimizer, a learning rate
or a loss carries none.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import tempfile
import textwrap
from typing import Any

import yaml

from . import advice
from .tables import TableError, split

JUDGED_PATH = os.path.join(advice.HERE, "advice_judged.json")


def _key(name: str, steps: int, batch: int, opt: dict, loss: dict) -> str:
    return json.dumps([name, steps, batch, opt["name"], opt["params"], loss["name"], loss["params"]],
                      sort_keys=True, default=float)


class Judge:
    """The protocol's value of a piece of advice: the grid's when it is a grid point, else trained once and
    cached (JSON: numbers only, read as data)."""

    def __init__(self, grid: dict[str, Any], steps: int, batch: int):
        self.grid, self.steps, self.batch = grid, steps, batch
        self.cache: dict[str, float] = {}
        if os.path.exists(JUDGED_PATH):
            with open(JUDGED_PATH) as fh:
                raw = json.load(fh)
            if not isinstance(raw, dict) or not all(isinstance(v, (int, float)) for v in raw.values()):
                raise ValueError(f"{JUDGED_PATH}: expected an object of numbers; delete it to recompute")
            self.cache = raw

    def __call__(self, name: str, data: dict[str, Any], opt: dict, loss: dict) -> float:
        g = advice.grid_summary(self.grid, name)
        v = advice.grid_point(g, data["task"], opt, loss)
        if v is not None:
            return v
        k = _key(name, self.steps, self.batch, opt, loss)
        if k not in self.cache:
            self.cache[k] = advice.judge(data, opt, loss, self.steps, self.batch)
            advice._write_json(JUDGED_PATH, self.cache)
        return self.cache[k]


def advice_rules() -> list[dict[str, Any]]:
    """The built-in rules that set an optimizer, a learning rate or a loss."""
    from optadvisor.advisor import builtin_rule_files

    out = []
    for entry in builtin_rule_files():
        fname = entry.name
        doc = yaml.safe_load(entry.read_text())
        for r in doc.get("rules", []):
            then = r.get("then", {})
            sets = bool(then.get("optimizer") or then.get("loss"))
            for target, vals in {**then.get("params", {}), **then.get("scale", {})}.items():
                if "lr" in vals or target.endswith("Loss"):
                    sets = True
            if sets:
                out.append({**r, "file": fname})
    return out


def _cfg(rec) -> tuple[dict, dict]:
    """What is trained: the optimizer's and the loss's names and hyperparameters (not the scores), every
    hyperparameter filled in from the catalog's defaults (so an unset lr and lr=1e-3 compare equal)."""
    task = rec.facts.task or "regression"
    opt = {k: advice._norm(v) for k, v in {**advice._defaults("optimizer", rec.optimizer.name, task),
                                            **rec.optimizer.params}.items()}
    loss = {k: advice._norm(v) for k, v in {**advice._defaults("loss", rec.loss.name, task),
                                             **rec.loss.params}.items()}
    return {"name": rec.optimizer.name, "params": opt}, {"name": rec.loss.name, "params": loss}


def _without(rule_id: str, tmp: str) -> str:
    path = os.path.join(tmp, f"without-{rule_id}.yaml")
    with open(path, "w") as fh:
        yaml.safe_dump({"rules": [{"id": rule_id, "enabled": False}]}, fh)
    return path


def records(steps: int, batch: int) -> dict[str, Any]:
    grid = advice.read_grid(steps, batch)
    judge = Judge(grid, steps, batch)
    halves = split()
    rules = advice_rules()
    out: dict[str, Any] = {r["id"]: {"fit": [], "report": []} for r in rules}
    skipped = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in grid["tables"]:
            try:
                data = advice.load(name)
            except TableError as exc:
                skipped.append(str(exc))
                continue
            row = {"naive": advice.grid_summary(grid, name)["naive"], "metric": grid["tables"][name]["metric"]}
            rec = advice.rules_advice(data, steps, batch)
            fired = {r.rule_id for r in rec.reasons}
            with_cfg = _cfg(rec)
            for r in rules:
                if r["id"] not in fired:
                    continue
                alt = advice.rules_advice(data, steps, batch, extra_rules=[_without(r["id"], tmp)])
                alt_cfg = _cfg(alt)
                entry = {"table": name, "changed": alt_cfg != with_cfg}
                if entry["changed"]:
                    v_with = judge(name, data, *with_cfg)
                    v_without = judge(name, data, *alt_cfg)
                    base = {**row, "naive": v_without}  # compare with the advice without the rule
                    entry.update(with_=v_with, without=v_without, verdict=advice.vs_naive(base, v_with),
                                 ratio=advice.ratio(base, v_with))
                out[r["id"]][halves[name]].append(entry)
    return {"steps": steps, "batch": batch, "skipped": skipped, "rules": out}


def record_line(entries: list[dict[str, Any]], half: str, steps: int, batch: int) -> str:
    changed = [e for e in entries if e["changed"]]
    if not entries:
        return f"{half} half ({steps}x{batch}): fired on no table"
    v = [e["verdict"] for e in changed]
    worst = max((e["ratio"] for e in changed), default=math.nan)
    gm = math.exp(sum(math.log(e["ratio"]) for e in changed) / len(changed)) if changed else math.nan
    text = (f"{half} half ({steps}x{batch}): fired on {len(entries)} tables, changed the advice on {len(changed)}")
    if changed:
        text += (f"; against the advice without it better on {v.count('better')}, within 2%/0.005 on "
                 f"{v.count('tie')}, worse on {v.count('worse')} (geometric mean ratio {gm:.3f}, worst {worst:.3f})")
    return text


RECORD_PREFIX = "Advice benchmark record"


def record_sentence(halves: dict[str, list], steps: int, batch: int) -> str:
    return (f"{RECORD_PREFIX} (python -m benchmarks.rule_records; with the rule against without it): "
            f"{record_line(halves['fit'], 'fitting', steps, batch)}; "
            f"{record_line(halves['report'], 'reporting', steps, batch)}.")


def write_records(records_by_rule: dict[str, str], rules_dir: str) -> list[str]:
    """Replace (or append) the record sentence at the end of each rule's ``because:``; the files changed."""
    changed = []
    for fname in sorted(os.listdir(rules_dir)):
        if not fname.endswith(".yaml"):
            continue
        path = os.path.join(rules_dir, fname)
        with open(path) as fh:
            text = fh.read()
        parsed = {r["id"]: r for r in yaml.safe_load(text).get("rules", [])}
        lines = text.split("\n")
        out: list[str] = []
        i = 0
        current = None
        while i < len(lines):
            line = lines[i]
            m = re.match(r"  - id: (\S+)\s*$", line)
            if m:
                current = m.group(1)
            if current in records_by_rule and line.startswith("    because:"):
                j = i + 1
                while j < len(lines) and (not lines[j].strip() or lines[j].startswith("      ")):
                    j += 1
                while j > i + 1 and not lines[j - 1].strip():
                    j -= 1
                old = re.sub(rf"\s*{RECORD_PREFIX} \(.*$", "", " ".join(str(parsed[current]["because"]).split()),
                             flags=re.S)
                body = f"{old} {records_by_rule[current]}".strip()
                out.append("    because: >-")
                out += textwrap.wrap(body, width=110, initial_indent="      ", subsequent_indent="      ",
                                     break_on_hyphens=False)
                i = j
                continue
            out.append(line)
            i += 1
        new = "\n".join(out)
        if new != text:
            yaml.safe_load(new)  # still valid YAML
            with open(path, "w") as fh:
                fh.write(new)
            changed.append(path)
    return changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.rule_records", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=advice.STEPS)
    ap.add_argument("--batch", type=int, default=advice.BATCH)
    ap.add_argument("--out", default="benchmark-report")
    ap.add_argument("--write", action="store_true", help="write each record into its rule's because: (rules/)")
    args = ap.parse_args(argv)
    rec = records(args.steps, args.batch)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "rule_records.json"), "w") as fh:
        json.dump(rec, fh, indent=1, default=float)
    for rid, halves in rec["rules"].items():
        print(f"{rid}:")
        for half in ("fit", "report"):
            print(f"  {record_line(halves[half], half, args.steps, args.batch)}")
            for e in halves[half]:
                if e["changed"]:
                    print(f"      {e['table']}: {e['with_']:.4f} with, {e['without']:.4f} without ({e['verdict']})")
    for s in rec["skipped"]:
        print(f"skipped: {s}")
    if args.write:
        from optadvisor.advisor import builtin_rule_files

        rules_dir = str(builtin_rule_files()[0].parent)
        sentences = {rid: record_sentence(h, args.steps, args.batch) for rid, h in rec["rules"].items()}
        for path in write_records(sentences, rules_dir):
            print(f"written: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
