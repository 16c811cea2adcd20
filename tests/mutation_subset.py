"""Triage for mutation testing on a small machine: each mutant runs a few of its covering tests, not all.

mutmut runs every test that covers a mutated function; for the kernels' step path that is ~500 tests and
~45 s per surviving mutant on two cores (hours per module). A mutant that a handful of fast tests kill is
killed whatever else runs, so a first pass with the fastest covering tests of each test file is sound for
kills; only its survivors need the full selection. Usage (from the repository root, after one
``mutmut run`` has written ``mutants/mutmut-stats.json``)::

    python tests/mutation_subset.py kernels._runtime.layout kernels._runtime.state   # restrict these modules' functions
    mutmut run "kernels._runtime.layout*" "kernels._runtime.state*"
    python tests/mutation_subset.py --restore                        # every covering test again
    python tests/mutation_subset.py kernels._runtime.state --files tests/test_optimizer_checkpoints.py --budget 30
    mutmut run NAME ...                                              # the survivors, with the full selection

The full coverage is kept beside it (``mutants/mutmut-stats.full.json``) until ``--restore``.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import sys
from pathlib import Path

STATS = Path("mutants/mutmut-stats.json")
FULL = Path("mutants/mutmut-stats.full.json")


def restrict(stats: dict, prefixes: list[str], per_file: int, budget: float,
             files: list[str] | None = None) -> dict[str, tuple[int, int]]:
    """Keep, for each function under ``prefixes``, the fastest covering tests of each test file in turn
    (round robin, at most ``per_file`` from one file) while their recorded time stays within ``budget``
    seconds; with ``files``, only tests of those files (paths as in the test ids). Returns
    {function: (tests before, tests kept)}."""
    durations = stats["duration_by_test"]
    changed = {}
    for function, tests in stats["tests_by_mangled_function_name"].items():
        if not any(function.startswith(p + ".") or function == p for p in prefixes):
            continue
        by_file = collections.defaultdict(list)
        for test in sorted(tests, key=lambda t: (durations.get(t, 0.0), t)):
            file = test.split("::")[0]
            if files is None or file in files:
                by_file[file].append(test)
        keep, total = [], 0.0
        for rank in range(per_file):
            for file in sorted(by_file):
                if rank < len(by_file[file]) and total + durations.get(by_file[file][rank], 0.0) <= budget:
                    keep.append(by_file[file][rank])
                    total += durations.get(by_file[file][rank], 0.0)
        stats["tests_by_mangled_function_name"][function] = keep
        changed[function] = (len(tests), len(keep))
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("modules", nargs="*", help="module prefixes, e.g. kernels._runtime.layout")
    parser.add_argument("--per-file", type=int, default=12, help="at most this many tests from one file")
    parser.add_argument("--budget", type=float, default=4.0, help="recorded seconds of tests per function")
    parser.add_argument("--files", nargs="+", metavar="FILE",
                        help="only tests of these files (e.g. tests/test_optimizer_checkpoints.py): the ones "
                             "that exercise a function on purpose, where the fastest tests only pass by")
    parser.add_argument("--restore", action="store_true", help="put the full coverage back")
    args = parser.parse_args(argv)
    if args.restore:
        if not FULL.exists():
            print(f"nothing to restore: {FULL} does not exist", file=sys.stderr)
            return 1
        shutil.move(FULL, STATS)
        print(f"restored the full coverage to {STATS}")
        return 0
    if not args.modules:
        parser.error("name at least one module prefix (or --restore)")
    if not STATS.exists():
        print(f"{STATS} does not exist: run `mutmut run` once first", file=sys.stderr)
        return 1
    if not FULL.exists():
        shutil.copy(STATS, FULL)
    stats = json.loads(FULL.read_text())
    current = json.loads(STATS.read_text())
    if args.files:
        known = {t.split("::")[0] for t in stats["duration_by_test"]}
        unknown = [f for f in args.files if f not in known]
        if unknown:
            parser.error(f"--files: no recorded test in {', '.join(unknown)} (paths as in the test ids, "
                         "e.g. tests/test_state.py)")
    changed = restrict(stats, args.modules, args.per_file, args.budget, args.files)
    if not changed:
        print(f"no function of {', '.join(args.modules)} in {STATS}", file=sys.stderr)
        return 1
    current["tests_by_mangled_function_name"].update(
        {f: stats["tests_by_mangled_function_name"][f] for f in changed})
    STATS.write_text(json.dumps(current))
    for function, (before, after) in sorted(changed.items()):
        print(f"{function}: {before} -> {after} tests")
    return 0


if __name__ == "__main__":
    sys.exit(main())
