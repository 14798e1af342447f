"""JSON that cannot hurt the server: nesting too deep for Python's parser (a RecursionError is a
500) is refused, and lone UTF-16 surrogates, which JSON can carry and UTF-8 cannot (re-encoding
them ends Gradio's event stream), are replaced with U+FFFD. At C speed and in one pass: it runs
on every JSON body before any login is checked. Knows bytes and JSON, not HTTP.
"""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

from backends.base import valid_text

MAX_DEPTH = 64  # JSON nesting; a chat request needs about 6


class TooDeep(ValueError):
    pass


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
# A string, or an unterminated one up to the end of the body: the pattern matches wherever it starts
# at a quote, so removing strings is one linear pass (a pattern that can fail on an unterminated
# string would be tried again at every later quote: quadratic).
_STRINGS = re.compile(rb'"(?:[^"\\]++|\\[\s\S]?)*+(?:"|\Z)')
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
_SIGNS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")


def safe_json(body: bytes) -> bytes:
    """The body to pass on: the same bytes, or a copy with lone surrogates replaced. Raises TooDeep
    past MAX_DEPTH. Other malformed JSON is left for the route to refuse."""
    if body.count(b"[") + body.count(b"{") > MAX_DEPTH and json_depth(body) > MAX_DEPTH:
        raise TooDeep(f"The JSON body nests deeper than {MAX_DEPTH} levels; no request here needs that.")
    if not _SURROGATE_ESCAPE.search(body):
        return body
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return body
    fixed = replace_lone_surrogates(data)
    if fixed == data:  # the escapes were whole pairs: nothing to replace
        return body
    return json.dumps(fixed, ensure_ascii=False).encode("utf-8")


def json_depth(body: bytes) -> int:
    """How deep a JSON text's arrays and objects nest (strings removed first), at C speed."""
    skeleton = _STRINGS.sub(b"", body).translate(None, _NOT_BRACKETS).translate(_SIGNS)
    return max(itertools.accumulate(memoryview(skeleton).cast("b")), default=0)


def replace_lone_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        return valid_text(value)
    if isinstance(value, list):
        return [replace_lone_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {replace_lone_surrogates(k): replace_lone_surrogates(v) for k, v in value.items()}
    return value
