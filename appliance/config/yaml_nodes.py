"""YAML nodes with their line numbers: the walker the YAML reader is built on.

A :class:`_Map` is one mapping of the file with the line of each key, checked
against the keys it may have; ``get`` parses a value and records a problem
(file, line, key, what was expected) instead of raising.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode

from appliance.config.problems import Problems
from appliance.config.values import Invalid


def _line(node: Node) -> int:
    return int(node.start_mark.line) + 1


class _Map:
    """A YAML mapping with its keys' lines, checked against the keys it may have."""

    def __init__(
        self,
        node: MappingNode,
        path: str,
        allowed: tuple[str, ...],
        problems: Problems,
        line: int | None = None,
    ) -> None:
        self.path = path
        self.line = _line(node) if line is None else line  # the line of the key naming it
        self.problems = problems
        self.items: dict[str, tuple[Node, int]] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, ScalarNode) else None
            where = _join(path, str(key))
            if not isinstance(key, str):
                problems.error(_line(key_node), path or "(top)", "keys must be plain names")
            elif key in self.items:
                first = self.items[key][1]
                problems.error(
                    _line(key_node), where, f"given twice (first on line {first}; expected once)"
                )
            elif allowed and key not in allowed:
                problems.error(
                    _line(key_node), where, f"unknown key (expected one of {', '.join(allowed)})"
                )
            else:
                self.items[key] = (value_node, _line(key_node))

    def key(self, name: str) -> str:
        return _join(self.path, name)

    def get(self, name: str, parser: Callable[[Any], Any]) -> Any:
        """Parse the value of ``name`` with ``parser``; ``None`` when absent or invalid."""
        if name not in self.items:
            return None
        node, line = self.items[name]
        try:
            return parser(_plain(node))
        except Invalid as problem:
            self.problems.error(line, self.key(name), str(problem))
            return None

    def line_of(self, name: str) -> int:
        return self.items[name][1] if name in self.items else self.line

    def mapping(self, name: str, allowed: tuple[str, ...]) -> _Map | None:
        if name not in self.items:
            return None
        node, line = self.items[name]
        if not isinstance(node, MappingNode):
            self.problems.error(line, self.key(name), "expected a mapping of keys to values")
            return None
        return _Map(node, self.key(name), allowed, self.problems, line)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _plain(node: Node) -> Any:
    """A node as plain Python data (scalars typed by YAML's rules)."""
    return SafeConstructor().construct_object(node, deep=True)


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise Invalid(f"{value!r} is not text (expected a string)")
    return value


def _choice(*options: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in options:
            raise Invalid(f"{value!r} is not allowed (expected one of {', '.join(options)})")
        return str(value)

    return parse


def _list_of(parser: Callable[[Any], Any]) -> Callable[[Any], tuple[Any, ...]]:
    def parse(value: Any) -> tuple[Any, ...]:
        items = value if isinstance(value, list) else [value]
        return tuple(parser(item) for item in items)

    return parse
