"""Rule conditions and parameter expressions: parsed once, type-checked, evaluated without eval.

An expression is parsed with :func:`ast.parse` and walked against an allow-list: comparisons (including
chained ones), ``and``/``or``/``not``, ``+ - * / // % **``, unary ``-``, ``in``/``not in`` against a literal
list, constants, declared fact names and the functions in :data:`FUNCTIONS`. Anything else (attributes,
subscripts, other calls, comprehensions, lambdas, dunder names, ...) raises :class:`RuleError` at load.
The walk builds a tree of small closures; evaluating it never calls ``eval``/``exec`` or any Python
function the expression names, only the operators listed here.

Unknown facts: a fact that is ``None`` makes the expression :data:`UNKNOWN` (three-valued logic), so a
rule whose condition needs it does not fire, and the engine can say which facts would change the advice.
``False and <unknown>`` is False, ``True or <unknown>`` is True, as in SQL.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from typing import Any


class RuleError(ValueError):
    """A problem in a rule file, a rule or an expression: the message names the file, line and rule id."""


class _Unknown:
    __slots__ = ()

    def __repr__(self) -> str:
        return "UNKNOWN"

    def __bool__(self) -> bool:  # an unknown must never be used as a truth value by accident
        raise TypeError("UNKNOWN has no truth value")


UNKNOWN = _Unknown()

# types of facts and expressions
NUMBER, BOOL, STR, NUMBERS = "number", "bool", "str", "list[number]"


def _balanced_weights(counts: list[float]) -> list[float]:
    """n / (C * count_c): the 'balanced' class weights (King & Zeng 2001; scikit-learn)."""
    total, n_classes = float(sum(counts)), len(counts)
    return [total / (n_classes * c) if c > 0 else 0.0 for c in counts]


# name -> (argument types, result type, implementation)
FUNCTIONS: dict[str, tuple[tuple[str, ...] | str, str, Callable[..., Any]]] = {
    "abs": ((NUMBER,), NUMBER, abs),
    "min": ("numbers", NUMBER, min),
    "max": ("numbers", NUMBER, max),
    "log10": ((NUMBER,), NUMBER, lambda x: math.log10(x) if x > 0 else float("-inf")),
    "sqrt": ((NUMBER,), NUMBER, lambda x: math.sqrt(x) if x >= 0 else float("nan")),
    "balanced_weights": ((NUMBERS,), NUMBERS, _balanced_weights),
}

_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
            ast.Gt: operator.gt, ast.GtE: operator.ge}
_ARITH = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
          ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_MAX_LENGTH = 500
# deeper than any rule needs, and shallow enough that building and evaluating the expression's closures stays
# far below Python's recursion limit whatever that limit is at the moment (hypothesis and torch change it)
_MAX_DEPTH = 100


def _depth(tree: ast.AST) -> int:
    """The AST's nesting depth, measured without recursion."""
    deepest, stack = 0, [(tree, 1)]
    while stack:
        node, d = stack.pop()
        deepest = max(deepest, d)
        stack.extend((child, d + 1) for child in ast.iter_child_nodes(node))
    return deepest


class Expression:
    """A parsed expression: ``source``, its result ``type``, the ``facts`` it reads, and ``evaluate``."""

    def __init__(self, source: str, fact_types: dict[str, str]):
        if not isinstance(source, str):
            raise RuleError(f"an expression must be a string (got {type(source).__name__}: {source!r})")
        if len(source) > _MAX_LENGTH:
            raise RuleError(f"expression longer than {_MAX_LENGTH} characters")
        self.source = source
        self.facts: set[str] = set()
        try:
            tree = ast.parse(source.strip(), mode="eval")
        except SyntaxError as exc:
            raise RuleError(f"cannot parse expression {source!r}: {exc.msg}") from None
        except (ValueError, MemoryError, RecursionError) as exc:
            raise RuleError(f"cannot parse expression {source!r}: {exc}") from None
        self._fact_types = fact_types
        if _depth(tree.body) > _MAX_DEPTH:
            raise RuleError(f"expression {source!r} is nested too deeply")
        try:
            self._fn, self.type = self._build(tree.body)
        except RecursionError:
            raise RuleError(f"expression {source!r} is nested too deeply") from None

    def evaluate(self, facts: dict[str, Any]) -> Any:
        """The value, or UNKNOWN when a fact it needs is unknown (None)."""
        try:
            return self._fn(facts)
        except (ZeroDivisionError, OverflowError, ValueError, TypeError) as exc:
            raise RuleError(f"expression {self.source!r} failed on these facts: {exc}") from None

    # ---- the allow-list walk -------------------------------------------------------------------------
    def _fail(self, node: ast.AST, what: str) -> RuleError:
        return RuleError(f"{what} is not allowed in rule expressions (in {self.source!r}, column "
                         f"{getattr(node, 'col_offset', 0) + 1})")

    def _build(self, node: ast.AST) -> tuple[Callable[[dict], Any], str]:
        if isinstance(node, ast.Constant):
            value = node.value
            if isinstance(value, bool):
                return (lambda f: value), BOOL
            if isinstance(value, (int, float)):
                return (lambda f: value), NUMBER
            if isinstance(value, str):
                return (lambda f: value), STR
            raise self._fail(node, f"the constant {value!r}")
        if isinstance(node, ast.Name):
            name = node.id
            if name.startswith("__"):
                raise self._fail(node, f"the dunder name {name!r}")
            if name in ("true", "false"):  # YAML-style booleans
                value = name == "true"
                return (lambda f: value), BOOL
            if name not in self._fact_types:
                known = ", ".join(sorted(self._fact_types))
                raise RuleError(f"unknown fact {name!r} in {self.source!r}; declared facts: {known}")
            self.facts.add(name)

            def read(f: dict, name: str = name) -> Any:
                value = f.get(name)
                return UNKNOWN if value is None else value
            return read, self._fact_types[name]
        if isinstance(node, ast.BoolOp):
            parts = [self._expect(v, BOOL, "and/or operand") for v in node.values]
            return (_all(parts) if isinstance(node.op, ast.And) else _any(parts)), BOOL
        if isinstance(node, ast.UnaryOp):
            if isinstance(node.op, ast.Not):
                inner = self._expect(node.operand, BOOL, "operand of 'not'")
                return _lift(lambda v: not v, inner), BOOL
            if isinstance(node.op, (ast.USub, ast.UAdd)):
                inner = self._expect(node.operand, NUMBER, "operand of unary minus")
                op = operator.neg if isinstance(node.op, ast.USub) else operator.pos
                return _lift(op, inner), NUMBER
            raise self._fail(node, type(node.op).__name__)
        if isinstance(node, ast.BinOp):
            op = _ARITH.get(type(node.op))
            if op is None:
                raise self._fail(node, f"the operator {type(node.op).__name__}")
            left = self._expect(node.left, NUMBER, "arithmetic operand")
            right = self._expect(node.right, NUMBER, "arithmetic operand")
            if op is operator.pow:
                op = _safe_pow
            return _lift(op, left, right), NUMBER
        if isinstance(node, ast.Compare):
            return self._compare(node), BOOL
        if isinstance(node, ast.Call):
            return self._call(node)
        raise self._fail(node, type(node).__name__)

    def _expect(self, node: ast.AST, expected: str, role: str) -> Callable[[dict], Any]:
        fn, typ = self._build(node)
        if typ != expected:
            raise RuleError(f"type mismatch in {self.source!r}: {role} must be a {expected}, "
                            f"got a {typ} ({ast.unparse(node)!r})")
        return fn

    def _compare(self, node: ast.Compare) -> Callable[[dict], Any]:
        tests = []
        left_node = node.left
        left, left_type = self._build(left_node)
        for op_node, right_node in zip(node.ops, node.comparators):
            if isinstance(op_node, (ast.In, ast.NotIn)):
                if not isinstance(right_node, (ast.List, ast.Tuple, ast.Set)):
                    raise RuleError(f"in {self.source!r}: 'in' needs a literal list on its right, e.g. "
                                    "model_kind in ['cnn', 'transformer']")
                items = []
                for elt in right_node.elts:
                    fn, typ = self._build(elt)
                    if not isinstance(elt, ast.Constant) or typ != left_type:
                        raise RuleError(f"type mismatch in {self.source!r}: the list after 'in' must hold "
                                        f"{left_type} constants ({ast.unparse(elt)!r})")
                    items.append(fn({}))
                members = frozenset(items)
                negate = isinstance(op_node, ast.NotIn)
                tests.append(_lift(lambda v, m=members, n=negate: (v in m) != n, left))
                right, right_type = None, left_type
            else:
                op = _COMPARE.get(type(op_node))
                if op is None:  # operator nodes carry no position: point at the comparison
                    raise self._fail(node, type(op_node).__name__)
                right, right_type = self._build(right_node)
                if right_type != left_type:
                    raise RuleError(f"type mismatch in {self.source!r}: cannot compare a {left_type} "
                                    f"({ast.unparse(left_node)!r}) with a {right_type} "
                                    f"({ast.unparse(right_node)!r})")
                if op not in (operator.eq, operator.ne) and left_type != NUMBER:
                    raise RuleError(f"type mismatch in {self.source!r}: '<', '>' order numbers only, "
                                    f"not {left_type}s")
                tests.append(_lift(op, left, right))
            if right is not None:
                left, left_node = right, right_node
        return _all(tests)

    def _call(self, node: ast.Call) -> tuple[Callable[[dict], Any], str]:
        if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
            name = ast.unparse(node.func)
            raise RuleError(f"the call {name}(...) is not allowed in {self.source!r}; allowed functions: "
                            f"{', '.join(sorted(FUNCTIONS))}")
        if node.keywords:
            raise self._fail(node, "a keyword argument")
        starred = next((a for a in node.args if isinstance(a, ast.Starred)), None)
        if starred is not None:
            raise self._fail(starred, "a starred argument")
        arg_types, result, impl = FUNCTIONS[node.func.id]
        if arg_types == "numbers":
            if not node.args:
                raise RuleError(f"{node.func.id}() needs at least one argument in {self.source!r}")
            args = [self._expect(a, NUMBER, f"argument of {node.func.id}") for a in node.args]
        else:
            if len(node.args) != len(arg_types):
                raise RuleError(f"{node.func.id}() takes {len(arg_types)} argument(s) in {self.source!r}")
            args = [self._expect(a, t, f"argument of {node.func.id}") for a, t in zip(node.args, arg_types)]
        return _lift(lambda *vs: impl(*vs), *args), result


def _lift(op: Callable[..., Any], *args: Callable[[dict], Any]) -> Callable[[dict], Any]:
    """Apply ``op`` to the arguments' values; UNKNOWN if any of them is UNKNOWN."""
    def fn(f: dict) -> Any:
        values = [a(f) for a in args]
        if any(v is UNKNOWN for v in values):
            return UNKNOWN
        return op(*values)
    return fn


def _all(parts: list[Callable[[dict], Any]]) -> Callable[[dict], Any]:
    return _connective(parts, decisive=False)


def _any(parts: list[Callable[[dict], Any]]) -> Callable[[dict], Any]:
    return _connective(parts, decisive=True)


def _connective(parts: list[Callable[[dict], Any]], decisive: bool) -> Callable[[dict], Any]:
    """and (decisive=False) / or (decisive=True) in three-valued logic: the first operand equal to
    ``decisive`` decides; otherwise UNKNOWN if any operand is unknown."""
    def fn(f: dict) -> Any:
        unknown = False
        for part in parts:
            v = part(f)
            if v is UNKNOWN:
                unknown = True
            elif bool(v) == decisive:
                return decisive
        return UNKNOWN if unknown else not decisive
    return fn


def _safe_pow(a: float, b: float) -> float:
    if abs(b) > 64 or abs(a) > 1e12:
        raise ValueError("exponent or base too large")
    return a ** b


def combine_all(parts: list[Callable[[dict], Any]]) -> Callable[[dict], Any]:
    return _all(parts)


def combine_any(parts: list[Callable[[dict], Any]]) -> Callable[[dict], Any]:
    return _any(parts)


def negate(part: Callable[[dict], Any]) -> Callable[[dict], Any]:
    return _lift(lambda v: not v, part)
