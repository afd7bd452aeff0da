"""Reading a study file: ``load_spec(path)`` parses the YAML safely (no code, bounded size and
nesting), validates it against ``study.spec.schema`` and ``study.spec.checks``, and returns a ``StudySpec``.
Any problem is a ``SpecError`` (one line, ``study.spec.errors``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from study.spec.checks import check_semantics
from study.spec.errors import SpecError, describe_value, pydantic_problem
from study.spec.schema import StudySpec

# Aliases are allowed (`train: &full {epochs: 50}` ... `train: *full`), but a document is refused
# once expanded past these limits: nine aliases of nine aliases of ... ("billion laughs") are 342
# bytes that expand to 10^9 values, and PyYAML's composer and every later pass recurse, so deep
# nesting or an alias inside its own anchor would end in a RecursionError. A study file needs
# 7 levels, a few hundred values and a few kB.
MAX_YAML_DEPTH = 32
MAX_YAML_VALUES = 10_000
MAX_YAML_CHARS = 1_000_000


class _Refused(yaml.MarkedYAMLError):
    """A document the loader will not expand (too deep, too large, or recursive)."""

    def __init__(self, mark: yaml.Mark, problem: str) -> None:
        super().__init__(problem=problem, problem_mark=mark)


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-4`` (no dot) as a float, as YAML 1.2 does, and refuses deep
    nesting and recursive aliases while composing (before anything recurses over them)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._open: list[str | None] = []  # the anchors of the nodes being composed, outermost first
        self._composed = 0  # nodes composed so far (an alias is not a new node)

    def fetch_flow_collection_start(self, token_class: type) -> None:
        # The scanner keeps a possible key per open bracket and rescans them all for each token,
        # so 50,000 `[` would take minutes before the composer saw the first level.
        if self.flow_level >= MAX_YAML_DEPTH:
            raise _Refused(self.get_mark(), f"expected at most {MAX_YAML_DEPTH} levels of nesting")
        super().fetch_flow_collection_start(token_class)

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self._open:
                raise _Refused(event.start_mark, f"expected no alias inside its own anchor (*{event.anchor} "
                               "is recursive)")
            return super().compose_node(parent, index)
        if len(self._open) >= MAX_YAML_DEPTH:
            raise _Refused(event.start_mark, f"expected at most {MAX_YAML_DEPTH} levels of nesting")
        self._composed += 1
        if self._composed > MAX_YAML_VALUES:
            raise _Refused(event.start_mark, f"expected at most {MAX_YAML_VALUES:,} values")
        self._open.append(event.anchor)
        try:
            return super().compose_node(parent, index)
        finally:
            self._open.pop()


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [child for pair in node.value for child in pair]
    return []


def _check_expansion(root: yaml.Node) -> None:
    """Refuse a document whose aliases expand it past MAX_YAML_VALUES values or MAX_YAML_DEPTH
    levels. Each distinct node is visited once (its expanded size and height are remembered), so
    this is linear in the file, whatever the aliases would expand to."""
    known: dict[int, tuple[int, int]] = {}  # id(node) -> (values, levels) once expanded

    def measure(node: yaml.Node, depth: int) -> tuple[int, int]:
        if id(node) not in known:
            if depth > MAX_YAML_DEPTH:
                raise _Refused(node.start_mark, f"expected at most {MAX_YAML_DEPTH} levels of nesting "
                               "once aliases are expanded")
            values, levels = 1, 1
            for child in _children(node):
                child_values, child_levels = measure(child, depth + 1)
                values, levels = values + child_values, max(levels, child_levels + 1)
                if values > MAX_YAML_VALUES:
                    raise _Refused(node.start_mark, f"expected at most {MAX_YAML_VALUES:,} values once aliases "
                                   "are expanded, got more (aliases of aliases?)")
            known[id(node)] = (values, levels)
        values, levels = known[id(node)]
        if depth + levels - 1 > MAX_YAML_DEPTH:
            raise _Refused(node.start_mark, f"expected at most {MAX_YAML_DEPTH} levels of nesting once aliases "
                           "are expanded")
        return values, levels

    measure(root, 1)


def _check_duplicates(node: yaml.Node, file: str, path: str = "") -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set[Any] = set()
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                line = key_node.start_mark.line + 1
                raise SpecError(file, path, f"line {line}: expected a plain name as a key, got a "
                                f"{'list' if isinstance(key_node, yaml.SequenceNode) else 'mapping'}")
            key = key_node.value
            sub = f"{path}.{key}" if path else str(key)
            if key in seen:
                line = key_node.start_mark.line + 1
                raise SpecError(file, sub, f"duplicate key (line {line}); expected each key once")
            seen.add(key)
            _check_duplicates(value_node, file, sub)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicates(item, file, f"{path}[{i}]")


def read_yaml(path: str | Path) -> Any:
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(file, "", "no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(file, "", f"cannot read it ({e})") from None
    if len(text) > MAX_YAML_CHARS:  # PyYAML reads ~2 MB/s: bound the time before parsing
        raise SpecError(file, "", f"expected at most {MAX_YAML_CHARS:,} characters, got {len(text):,}")
    try:
        loader = _Loader(text)  # PyYAML's reader refuses a NUL byte or another control character here
    except yaml.reader.ReaderError as e:
        line = text.count("\n", 0, e.position) + 1
        column = e.position - text.rfind("\n", 0, e.position)
        character = f"U+{e.character:04X}" if isinstance(e.character, int) else repr(e.character)
        raise SpecError(file, "", f"line {line}, column {column}: expected printable text, got the control character "
                        f"{character}{' (a NUL byte: is it a binary file?)' if e.character == 0 else ''}") from None
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        _check_duplicates(node, file)
        return loader.construct_document(node)
    except _Refused as e:
        mark = e.problem_mark
        raise SpecError(file, "", f"line {mark.line + 1}, column {mark.column + 1}: {e.problem}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "?"
        raise SpecError(file, "", f"{where}: expected valid YAML ({e.problem})") from None
    except yaml.YAMLError as e:
        raise SpecError(file, "", f"expected valid YAML ({e})") from None
    finally:
        loader.dispose()


def validate_spec(data: Any, file: str | Path = "<spec>") -> StudySpec:
    file = str(file)
    if not isinstance(data, dict):
        raise SpecError(file, "", f"expected a mapping of sections at the top level, got {describe_value(data)}")
    try:
        spec = StudySpec.model_validate(data)
    except ValidationError as e:
        path, message = pydantic_problem(e.errors()[0])
        raise SpecError(file, path, message) from None
    check_semantics(file, spec)
    return spec


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a study file; raises :class:`SpecError` (one line) on any problem."""
    return validate_spec(read_yaml(path), path)
