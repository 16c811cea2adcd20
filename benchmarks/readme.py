"""``python -m benchmarks readme``: the README's measured figures, copied from the reports that measured them.

Every table of figures in README.md sits between two markers naming the report it comes from and the table's
header::

    <!-- generated: benchmarks/latest/report.md | | optimizer | workload | -->
    ...the table, written by this command...
    <!-- /generated -->

This command rewrites each such block with the named report's table (the first table whose header line starts
with the given text; only its rows that contain a text when the marker adds ``rows "| report |"``; the report's
``Machine:`` line above it when the marker ends in ``+ machine``), and redraws
``benchmarks/latest/ratios.png`` from ``benchmarks/latest/results.json`` when the chart was not drawn from that
file (the chart records the SHA-256 of the results it was drawn from). ``--check`` changes nothing and exits 1
when the README or the chart has drifted from the reports (``tests/test_docs.py`` runs it), so a figure in the
README is always the one in the report beside it: to change a figure, run the benchmark, copy its output into
``benchmarks/latest/`` and run this command.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN = re.compile(r'^<!-- generated: (?P<file>\S+) \| (?P<header>.+?)(?: rows "(?P<rows>[^"]+)")?'
                   r'(?P<machine> \+ machine)? -->$')
END = "<!-- /generated -->"
RESULTS = "benchmarks/latest/results.json"
CHART = "benchmarks/latest/ratios.png"


class DocError(ValueError):
    """A marker that names no file, no table, or is never closed."""


def table(text: str, header: str, where: str) -> list[str]:
    """The first Markdown table in ``text`` whose header line starts with ``header``."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(header) and (i == 0 or not lines[i - 1].startswith("|")):
            out = []
            for row in lines[i:]:
                if not row.startswith("|"):
                    break
                out.append(row)
            return out
    raise DocError(f"{where}: no table whose header starts with {header!r}")


def machine(text: str, where: str) -> str:
    for line in text.splitlines():
        if line.startswith("Machine:"):
            return line
    raise DocError(f"{where}: the report has no 'Machine:' line")


def render(readme: str, root: Path = ROOT) -> str:
    """README text with every generated block rewritten from its report."""
    out: list[str] = []
    lines = readme.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        out.append(line)
        m = BEGIN.match(line)
        i += 1
        if not m:
            continue
        where = f"README.md line {i}"
        try:
            end = lines.index(END, i)
        except ValueError:
            raise DocError(f"{where}: a generated block without its closing {END!r}") from None
        source = root / m["file"]
        if not source.is_file():
            raise DocError(f"{where}: {m['file']} does not exist")
        text = source.read_text()
        if m["machine"]:
            out += [machine(text, f"{where} ({m['file']})"), ""]
        rows = table(text, m["header"], f"{where} ({m['file']})")
        if m["rows"]:
            rows = rows[:2] + [r for r in rows[2:] if m["rows"] in r]
            if len(rows) == 2:
                raise DocError(f"{where}: no row of the {m['file']} table contains {m['rows']!r}")
        out += rows
        out.append(END)
        i = end + 1
    return "\n".join(out) + ("\n" if readme.endswith("\n") else "")


def results_hash(root: Path = ROOT) -> str:
    return hashlib.sha256((root / RESULTS).read_bytes()).hexdigest()


def chart_source(root: Path = ROOT) -> str | None:
    """The SHA-256 recorded in the chart (a PNG text chunk, key 'Source'), or None."""
    data = (root / CHART).read_bytes() if (root / CHART).is_file() else b""
    for m in re.finditer(rb"tEXtSource\x00results.json sha256 ([0-9a-f]{64})", data):
        return m.group(1).decode()
    return None


def redraw_chart(root: Path = ROOT) -> str:
    from .__main__ import chart

    results = json.loads((root / RESULTS).read_text())["results"]
    return chart(results, str(root / CHART), source=f"results.json sha256 {results_hash(root)}")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks readme", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if the README or chart drifted")
    args = ap.parse_args(argv)
    path = ROOT / "README.md"
    old = path.read_text()
    try:
        new = render(old)
    except DocError as exc:
        print(f"python -m benchmarks readme: error: {exc}", file=sys.stderr)
        return 2
    stale_chart = chart_source() != results_hash()
    if args.check:
        if new != old:
            sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True), "README.md",
                                                       "README.md (from the reports)"))
        if stale_chart:
            print(f"{CHART} was not drawn from {RESULTS}: run python -m benchmarks readme")
        return 1 if new != old or stale_chart else 0
    if new != old:
        path.write_text(new)
        print("README.md: generated blocks rewritten")
    if stale_chart:
        print(redraw_chart())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
