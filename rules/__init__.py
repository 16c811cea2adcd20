"""The built-in rulebook (YAML, content not code), installed as the ``advisor.rules`` package data."""
