"""YAML nodes with their line numbers: the walker the YAML reader is built on.

:func:`compose` turns the text into a node graph, bounded: at most
:data:`MAX_DEPTH` levels of nesting and :data:`MAX_VALUES` values, counted with
every alias expanded (an alias bomb composes cheaply but explodes when it is
constructed, iterated or printed), no alias that refers to its own ancestor, and
no explicit tag (``!!int``, ``!!binary``, ``!!python/...``, ``!foo``): every value
is typed by YAML's implicit rules only and then checked by this schema. Refusals
are recorded as problems (file, line, key, what was expected); the graph is
returned only when it is safe to construct.

A :class:`_Map` is one mapping of the file with the line of each key, checked
against the keys it may have; ``get`` parses a value and records a problem
(file, line, key, what was expected) instead of raising.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml
from yaml.constructor import SafeConstructor
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from appliance.config.problems import Problems
from appliance.config.values import Invalid, listed, shown

MAX_DEPTH = 32  # levels of nesting (the schema needs 7)
MAX_VALUES = 20_000  # scalars, sequences and mappings, with aliases expanded
MAX_NUMBER = 32  # characters of a number (int() refuses 4300 digits and more)
_CORE = "tag:yaml.org,2002:"
_YAML_BREAKS = re.compile("\r\n|[\n\r\x85\u2028\u2029]")


class _Refused(yaml.MarkedYAMLError):
    """A limit of :func:`compose`, with the key path where it was reached."""

    def __init__(self, problem: str, mark: Any, key: str) -> None:
        super().__init__(problem=problem, problem_mark=mark)
        self.line = int(mark.line) + 1
        self.key = key


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's pure-Python SafeLoader, composing at most MAX_DEPTH levels and
    MAX_VALUES nodes, and noting every explicit tag (with its node's key path)."""

    too_deep = f"is nested more than {MAX_DEPTH} levels deep (expected at most {MAX_DEPTH})"

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.depth = 0
        self.count = 0
        self.keys: list[str] = []
        self.tagged: dict[int, str] = {}  # id(node) -> the tag written

    def fetch_flow_collection_start(self, TokenClass: Any) -> None:
        """``[`` or ``{`` beyond MAX_DEPTH flow levels: refused by the scanner, which
        looks up to 1024 characters ahead and would scan a line of ``[`` quadratically
        before the composer reaches its own limit."""
        if self.flow_level >= MAX_DEPTH:
            raise _Refused(self.too_deep, self.get_mark(), self.path())
        super().fetch_flow_collection_start(TokenClass)

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        if self.check_event(AliasEvent):
            return super().compose_node(parent, index)
        event: Any = self.peek_event()  # type: ignore[no-untyped-call]
        key = isinstance(parent, MappingNode) and isinstance(index, ScalarNode)
        if key:
            self.keys.append(str(index.value))
        try:
            self.count += 1
            if self.count > MAX_VALUES:
                raise _Refused(
                    f"holds more than {MAX_VALUES} values (expected at most {MAX_VALUES})",
                    event.start_mark,
                    "(file)",
                )
            if self.depth >= MAX_DEPTH:
                raise _Refused(self.too_deep, event.start_mark, self.path())
            self.depth += 1
            try:
                node = super().compose_node(parent, index)
            except RecursionError:  # a deep stack at the call, whatever MAX_DEPTH says
                raise _Refused(
                    f"is nested too deep to read (expected at most {MAX_DEPTH} levels)",
                    event.start_mark,
                    self.path(),
                ) from None
            finally:
                self.depth -= 1
        finally:
            if key:
                self.keys.pop()
        if node is not None and getattr(event, "tag", None) is not None:
            self.tagged[id(node)] = str(event.tag)
        return node

    def path(self) -> str:
        return _short_path(".".join(shown(key, text=True) for key in self.keys) or "(top)")


def _short_path(path: str, most: int = 200) -> str:
    """A key path of at most ``most`` characters: its end, where the problem is."""
    return path if len(path) <= most else "…" + path[1 - most :]


def yaml_line(text: str, position: int) -> int:
    """The line (from 1) of character ``position``, counting line breaks as YAML does."""
    return len(_YAML_BREAKS.findall(text, 0, position)) + 1


def compose(text: str, problems: Problems) -> Node | None:
    """The node graph of ``text``, or ``None`` with the problems recorded."""
    loader: _BoundedLoader | None = None
    try:
        loader = _BoundedLoader(text)  # checks that every character is printable
        root: Node | None = loader.get_single_node()
    except _Refused as error:
        problems.error(error.line, error.key, str(error.problem))
        return None
    except yaml.reader.ReaderError as error:
        code = error.character if isinstance(error.character, int) else 0
        problems.error(
            yaml_line(text, int(error.position)),
            "(yaml)",
            f"not valid YAML: character #x{code:04x} is not allowed (expected printable "
            "text: no control characters but tab and line breaks)",
        )
        return None
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        what = error.problem or error.context or "cannot be read"
        line = int(mark.line) + 1 if mark is not None else 1
        context, first = error.context, error.context_mark
        if context and error.problem and not context.startswith("while") and first:
            # "found duplicate anchor 'a'; first occurrence" + "second occurrence"
            what = f"{context} on line {int(first.line) + 1}, {error.problem}"
        problems.error(line, "(yaml)", f"not valid YAML: {shown(what, text=True, limit=120)}")
        return None
    except yaml.YAMLError as error:  # none other is raised on text input; kept one line
        problems.error(1, "(yaml)", f"not valid YAML: {shown(str(error), text=True)}")
        return None
    except RecursionError:  # a deep stack at the call, whatever MAX_DEPTH says
        problems.error(
            int(loader.line) + 1 if loader else 1,
            loader.path() if loader else "(top)",
            f"is nested too deep to read (expected at most {MAX_DEPTH} levels)",
        )
        return None
    finally:
        if loader is not None:
            loader.dispose()
    if root is not None and not _Graph(loader.tagged, problems).safe(root):
        return None
    return root


@dataclass
class _Measure:
    size: int  # nodes, with aliases expanded
    height: int  # levels, with aliases expanded


class _Graph:
    """Checks a composed graph before anything constructs it: explicit tags, aliases
    that refer to their own ancestor, and the size and depth once aliases are expanded.

    Aliases are the same node object as their anchor, so the walk is memoised by
    node: it costs the composed size, however large the expanded one."""

    def __init__(self, tagged: dict[int, str], problems: Problems) -> None:
        self.tagged = tagged
        self.problems = problems
        self.measured: dict[int, _Measure] = {}
        self.open: set[int] = set()  # nodes being measured: an alias to one is a cycle
        self.seen: dict[int, int] = {}  # how often each node is reached
        self.errors = 0

    def safe(self, root: Node) -> bool:
        measure = self._measure(root, "(top)", _line(root))
        if self.errors:
            return False
        if measure.size > MAX_VALUES or measure.height > MAX_DEPTH:
            self._locate(root, "(top)", _line(root), 0)
            return False
        return True

    def _error(self, line: int, key: str, message: str) -> None:
        self.errors += 1
        self.problems.error(line, _short_path(key), message)

    def _children(self, node: Node, path: str, line: int) -> list[tuple[Node, str, int]]:
        """(child, its key path, the line to report it at): a mapping's keys and values,
        a sequence's items (under the sequence's key)."""
        if isinstance(node, MappingNode):
            out: list[tuple[Node, str, int]] = []
            for key_node, value_node in node.value:
                if isinstance(key_node, ScalarNode):
                    name = shown(str(key_node.value), text=True)
                    where = name if path == "(top)" else f"{path}.{name}"
                else:
                    where = path
                out += [(key_node, path, _line(key_node)), (value_node, where, _line(key_node))]
            return out
        if isinstance(node, SequenceNode):
            return [(item, path, line) for item in node.value]
        return []

    def _measure(self, node: Node, path: str, line: int) -> _Measure:
        ident = id(node)
        self.seen[ident] = self.seen.get(ident, 0) + 1
        known = self.measured.get(ident)
        if known is not None:
            return known
        if ident in self.open:
            self._error(
                line,
                path,
                "an alias refers to a mapping or sequence that contains it (expected no "
                "recursive structure)",
            )
            return _Measure(0, 0)
        tag = self.tagged.get(ident)
        if tag is not None:
            if tag.startswith(_CORE):
                tag = "!!" + tag[len(_CORE) :]
            self._error(
                _line(node),
                path,
                f"explicit tag {shown(tag, text=True)} is not accepted (expected a plain "
                "value, typed by YAML's own rules; quote it to make it text)",
            )
        self.open.add(ident)
        size, height = 1, 0
        for child, where, at in self._children(node, path, line):
            measure = self._measure(child, where, at)
            size += measure.size
            height = max(height, measure.height)
        self.open.discard(ident)
        measure = _Measure(size, height + 1)
        self.measured[ident] = measure
        return measure

    def _locate(self, node: Node, path: str, line: int, depth: int) -> None:
        """Report, once, the innermost key whose value is too large or too deep: descend
        while one child alone is over a limit and is written there (not an alias)."""
        for child, where, at in self._children(node, path, line):
            measure = self.measured[id(child)]
            if measure.size > MAX_VALUES or depth + 1 + measure.height > MAX_DEPTH:
                if self.seen.get(id(child), 0) == 1:
                    self._locate(child, where, at, depth + 1)
                else:
                    self._too_much(where, at, depth + 1, measure)
                return
        self._too_much(path, line, depth, self.measured[id(node)])

    def _too_much(self, path: str, line: int, depth: int, measure: _Measure) -> None:
        if measure.size > MAX_VALUES:
            self._error(
                line,
                path,
                f"holds {measure.size} values once its aliases are expanded (expected at "
                f"most {MAX_VALUES})",
            )
        else:
            self._error(
                line,
                path,
                f"is nested {depth + measure.height} levels deep once its aliases are "
                f"expanded (expected at most {MAX_DEPTH})",
            )


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
    name = shown(key, text=True)
    return f"{path}.{name}" if path else name


class _Constructor(SafeConstructor):
    """SafeConstructor for a graph :func:`compose` passed: numbers of at most
    MAX_NUMBER characters, and timestamps and ``=`` read as the text they are (the
    schema has no dates; ``2024-02-30`` made PyYAML raise ValueError)."""


def _short_number(node: ScalarNode) -> None:
    text = str(node.value)
    if len(text) > MAX_NUMBER:
        raise Invalid(
            f"{shown(text)} is too long for a number (expected at most {MAX_NUMBER} characters)"
        )


def _bounded_int(constructor: Any, node: Any) -> Any:
    _short_number(node)
    return constructor.construct_yaml_int(node)


def _bounded_float(constructor: Any, node: Any) -> Any:
    _short_number(node)
    return constructor.construct_yaml_float(node)


def _text(constructor: Any, node: Any) -> Any:
    return constructor.construct_scalar(node)


_Constructor.add_constructor("tag:yaml.org,2002:int", _bounded_int)
_Constructor.add_constructor("tag:yaml.org,2002:float", _bounded_float)
_Constructor.add_constructor("tag:yaml.org,2002:timestamp", _text)
_Constructor.add_constructor("tag:yaml.org,2002:value", _text)


def _plain(node: Node) -> Any:
    """A node as plain Python data (scalars typed by YAML's rules); :class:`Invalid`
    when it cannot be one (``0x_``, a merge of a scalar, an unhashable key)."""
    try:
        return _Constructor().construct_object(node, deep=True)
    except Invalid:
        raise
    except yaml.MarkedYAMLError as error:
        what = shown(error.problem or "cannot be read", text=True, limit=120)
        raise Invalid(f"{what} (expected plain YAML values)") from None
    except (yaml.YAMLError, ValueError, TypeError, OverflowError, RecursionError) as error:
        raise Invalid(
            f"cannot be read: {shown(str(error), text=True)} (expected plain YAML values)"
        ) from None


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise Invalid(f"{shown(value)} is not text (expected a string)")
    return value


def _choice(*options: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if not isinstance(value, str) or value not in options:
            raise Invalid(f"{shown(value)} is not allowed (expected one of {listed(options)})")
        return value

    return parse


def _list_of(parser: Callable[[Any], Any]) -> Callable[[Any], tuple[Any, ...]]:
    def parse(value: Any) -> tuple[Any, ...]:
        items = value if isinstance(value, list) else [value]
        return tuple(parser(item) for item in items)

    return parse
