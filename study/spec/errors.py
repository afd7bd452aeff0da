"""How a problem in a study file reads: one line ``FILE: key.path: expected ...`` (``SpecError``).

The CLI prints it and exits 2 before anything is written. ``pydantic_problem`` turns the first
error of a pydantic validation into that wording (the key path as written in the file, and what
was expected instead of what was found).
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

# The ``type:`` of a search-space entry (study.spec.schema.SpaceEntry), named in the messages.
ENTRY_TYPES = ("float", "int", "categorical", "fixed")


class SpecError(ValueError):
    """A study file that cannot be run: ``FILE: key.path: message`` (one line)."""

    def __init__(self, file: str | Path, path: str, message: str) -> None:
        self.file, self.path, self.message = str(file), path, message
        super().__init__(f"{self.file}: {path}: {message}" if path else f"{self.file}: {message}")


def did_you_mean(word: str, options: list[str]) -> str:
    """' (did you mean X?)' for the closest of ``options``, or ''."""
    match = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean {match[0]}?)" if match else ""


# Parts of a pydantic error location that name a union member, not a key of the file.
_UNION_TAGS = {*ENTRY_TYPES, "int", "float", "str", "bool", "none", "list[...]", "dict[str,...]"}


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _UNION_TAGS or str(part).startswith(("function-", "constrained-", "lax-or-strict", "json-or")):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def describe_value(value: Any) -> str:
    """A value as the file would show it, cut to 60 characters."""
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_TYPE_WORDS = {"float_parsing": "a number", "float_type": "a number", "int_parsing": "an integer",
               "int_type": "an integer", "int_from_float": "an integer", "bool_parsing": "true or false",
               "bool_type": "true or false", "string_type": "a string", "list_type": "a list",
               "finite_number": "a finite number"}


def pydantic_problem(err: dict[str, Any]) -> tuple[str, str]:
    """(key path, 'expected ...') for the first pydantic error."""
    kind, loc, ctx = err["type"], tuple(err["loc"]), err.get("ctx") or {}
    path = _format_loc(loc)
    if kind == "unknown_key":
        return (f"{path}.{ctx['key']}" if path else ctx["key"]), err["msg"]
    if kind == "missing":
        return path, "expected a value (required key is missing)"
    if kind == "union_tag_not_found":
        return path, (f"expected a mapping with type: one of {', '.join(ENTRY_TYPES)} "
                      "(or a number, or a list of choices)")
    if kind == "union_tag_invalid":
        return path, f"expected type one of {', '.join(ENTRY_TYPES)}, got {describe_value(ctx.get('tag'))}"
    if kind == "spec":
        return path, err["msg"]
    shown = "input" in err and not isinstance(err["input"], (dict, list))
    got = f", got {describe_value(err['input'])}" if shown else ""
    if kind in _TYPE_WORDS:
        return path, f"expected {_TYPE_WORDS[kind]}{got}"
    if kind == "too_short":
        return path, f"expected at least {ctx.get('min_length')} item(s), got {ctx.get('actual_length')}"
    msg = err["msg"]
    for prefix in ("Input should be ", "Value error, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    msg = msg[0].lower() + msg[1:] if msg else msg
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return path, f"expected a mapping of keys, got {describe_value(err.get('input'))}"
    if kind == "string_pattern_mismatch":
        return path, f"expected letters, digits, '_', '-' or '.' (a name), got {describe_value(err.get('input'))}"
    if not msg.startswith("expected"):
        msg = f"expected {msg}"
    return path, msg + got
