"""Reading YAML and JSON that come from other people: bounded before and while parsing.

Rule files come from teams and from the internet, fact files and training histories from anywhere. Plain
``yaml.safe_load`` expands aliases without limit (a 535-byte "billion laughs" file takes gigabytes), keeps
the last of two equal keys silently, recurses once per nesting level and hands 5,000-digit numbers to
``int``. Here, before a single object is built:

- the file must be UTF-8 and at most :data:`MAX_BYTES`;
- aliases (``*name``) are refused, so what a file expands to is what it says; anchors alone are harmless;
- nesting deeper than :data:`MAX_DEPTH` is refused;
- a number longer than :data:`MAX_NUMBER_CHARS` characters is refused;
- a key repeated in one mapping is refused, with both lines.

Every refusal is an :class:`InputError` (a ValueError) with the file and line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

MAX_BYTES = 4 << 20
MAX_DEPTH = 64
MAX_NUMBER_CHARS = 64


class InputError(ValueError):
    """A file that cannot be read as bounded YAML/JSON; the message starts with ``file:line:``."""


class _Refused(Exception):
    def __init__(self, mark, message: str) -> None:
        super().__init__(message)
        self.line = mark.line + 1 if mark is not None else None


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases, deep nesting, long numbers and duplicate keys."""

    def __init__(self, stream) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _Refused(event.start_mark, f"YAML aliases (*{event.anchor}) are not allowed: write the value "
                                             "out (an alias can make a small file expand without bound)")
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(self.peek_event().start_mark, f"nested more than {MAX_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    raise _Refused(key_node.start_mark, "a mapping key must be a plain value, not a list or mapping")
                key = self.construct_object(key_node)
                if key in seen:
                    raise _Refused(key_node.start_mark, f"duplicate key {key!r} (first at line {seen[key]}); "
                                                        "YAML would silently keep only the last one")
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _bounded_length(node) -> None:
    if len(node.value) > MAX_NUMBER_CHARS:
        raise _Refused(node.start_mark, f"a number of {len(node.value)} characters "
                                        f"(at most {MAX_NUMBER_CHARS}): {node.value[:20]}...")


def _bounded_int(loader, node):
    _bounded_length(node)
    return yaml.SafeLoader.construct_yaml_int(loader, node)


def _bounded_float(loader, node):
    _bounded_length(node)
    return yaml.SafeLoader.construct_yaml_float(loader, node)


# registered once at import; the checks themselves run (and are tested) at each load
_BoundedLoader.add_constructor("tag:yaml.org,2002:int", _bounded_int)
_BoundedLoader.add_constructor("tag:yaml.org,2002:float", _bounded_float)


def read_text(path: str | Path, what: str) -> str:
    """The file's text: UTF-8, at most MAX_BYTES. ``what`` names the file's role in messages."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_BYTES + 1)
    except OSError as exc:
        raise InputError(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    if len(raw) > MAX_BYTES:
        raise InputError(f"{path}: {what} larger than {MAX_BYTES >> 20} MiB")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: {what} is not UTF-8 text (byte {raw[exc.start]:#04x} at offset "
                         f"{exc.start})") from None


def load_yaml(text: str, where: str) -> tuple[Any, yaml.Node | None]:
    """(data, root node) of one YAML document, bounded as the module says; ``where`` is the file name."""
    loader = None
    try:
        loader = _BoundedLoader(text)  # the reader checks the characters here
        root = loader.get_single_node()
        data = loader.construct_document(root) if root is not None else None
    except _Refused as exc:
        raise InputError(f"{where}:{exc.line}: {exc}" if exc.line else f"{where}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        if mark is None and isinstance(exc, yaml.reader.ReaderError):
            line = text[:exc.position].count("\n") + 1
            raise InputError(f"{where}:{line}: character {exc.character:#x} is not allowed in YAML") from None
        at = f"{where}:{mark.line + 1}" if mark else where
        raise InputError(f"{at}: malformed YAML: {getattr(exc, 'problem', None) or exc}") from None
    except RecursionError:  # pragma: no cover - MAX_DEPTH stops nesting long before the stack
        raise InputError(f"{where}: nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()
    return data, root


def load_json(text: str, where: str) -> Any:
    """One JSON document, with JSON's own duplicate-key, depth and number bounds made errors."""
    def no_duplicates(pairs):
        out = {}
        for k, v in pairs:
            if k in out:
                raise InputError(f"{where}: duplicate key {k!r} in one JSON object")
            out[k] = v
        return out

    def bounded(s: str):
        if len(s) > MAX_NUMBER_CHARS:
            raise InputError(f"{where}: a number of {len(s)} characters (at most {MAX_NUMBER_CHARS})")
        return float(s) if any(c in s for c in ".eE") else int(s)

    try:
        return json.loads(text, object_pairs_hook=no_duplicates, parse_float=bounded, parse_int=bounded)
    except RecursionError:
        raise InputError(f"{where}: nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}:{exc.lineno}: malformed JSON: {exc.msg}") from None
