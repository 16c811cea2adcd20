"""The shape of kernels/: rooms by job (optim/, losses/, precision/, _runtime/), no module over 300 lines, and
no import circle — counting imports inside functions too (a lazy import that breaks a circle at run time still
ties the two modules together), and leaving out ``if TYPE_CHECKING:`` blocks (never run)."""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = os.path.join(ROOT, "kernels")
MAX_LINES = 300


def _modules() -> dict[str, str]:
    """module name (kernels.optim.adam) -> path, for every .py file under kernels/."""
    out = {}
    for dirpath, _, files in os.walk(KERNELS):
        for fn in files:
            if fn.endswith(".py"):
                path = os.path.join(dirpath, fn)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = path
    return out


def _imports(name: str, path: str, known: set[str]) -> set[str]:
    """The kernels modules ``name`` imports at run time (module level or inside functions)."""
    tree = ast.parse(open(path).read())
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()

    def visit(node, type_checking=False):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[:len(package.split(".")) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("optadvisor.kernels"):
            target = node.module.replace("optadvisor.", "", 1)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    found.discard(name)
    return {m for m in found if m in known}


def test_no_module_over_300_lines():
    long = {name: n for name, path in _modules().items() if (n := len(open(path).read().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_no_import_circle():
    mods = _modules()
    graph = {name: _imports(name, path, set(mods)) for name, path in mods.items()}
    # a package's __init__ importing its own submodules is how a package exposes them, not a circle
    graph = {m: {d for d in deps if not (d.startswith(m + ".") and mods[m].endswith("__init__.py"))}
             for m, deps in graph.items()}
    seen, stack, cycles = set(), [], []

    def walk(m):
        if m in stack:
            cycles.append(stack[stack.index(m):] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for d in sorted(graph[m]):
            walk(d)
        stack.pop()

    for m in sorted(graph):
        walk(m)
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_rooms():
    """Every algorithm, loss, precision piece and runtime piece in its room; at the top only the package, the
    catalog and the factory."""
    top = sorted(f for f in os.listdir(KERNELS) if f.endswith(".py"))
    assert top == ["__init__.py", "_catalog.py", "_factory.py"]
    for room in ("optim", "losses", "precision", "_runtime"):
        assert os.path.isfile(os.path.join(KERNELS, room, "__init__.py")), room
