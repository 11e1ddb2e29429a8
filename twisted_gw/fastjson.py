"""
JSON on the hot path: the standard library's results, at orjson's speed where
orjson gives the same.

L{loads} reads exactly what C{json.loads} reads from UTF-8, and L{dumps}
writes exactly the bytes of C{json.dumps(obj, ensure_ascii=False,
separators=(",", ":"))} (llama.cpp's compact form); orjson does each in a
third to a tenth of the time for the small objects of an event stream.  Each
checks, cheaply, for the few inputs where orjson would answer differently,
and leaves those to the standard library.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import orjson

NOT_JSON = object()

# The standard library's own scanner (C), called directly: for a small object, the checks and decoding that
# json.loads wraps around it cost about as much as the parsing.
_scan: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def refuse_constant(constant: str) -> Any:
    """A C{parse_constant} for C{json.loads} that refuses NaN and the infinities."""
    raise ValueError(f"{constant} is not JSON")


_scan_strict: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder(  # type: ignore[attr-defined]
    parse_constant=refuse_constant).scan_once
_SPACE = " \t\n\r"
# every ASCII digit as 0, every other byte as it is: a run of digits is then a run of 0s (bytes.translate and a
# substring search: a regular expression takes ten times as long)
_DIGITS_AS_ZERO = bytes(b"0"[0] if 0x30 <= i <= 0x39 else i for i in range(256))
_LONG_NUMBER = b"0" * 19


def loads(data: bytes, constants: bool = True) -> Any:
    """
    C{data} as JSON, exactly as C{json.loads} reads UTF-8; L{NOT_JSON} when it
    is not.  orjson reads it unless it has a number orjson would read as a
    float (19 digits or more); what orjson refuses and the standard library
    takes (NaN, lone surrogates) is read by the standard library's scanner.
    C{constants=False}: NaN, Infinity and -Infinity, which JSON has not, are
    refused as well (the standard library takes them).
    """
    if _LONG_NUMBER not in data.translate(_DIGITS_AS_ZERO):
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
    try:
        text = data.decode("utf-8")
        if text[:1] in _SPACE:
            text = text.lstrip(_SPACE)
        obj, end = (_scan if constants else _scan_strict)(text, 0)
    except (ValueError, StopIteration, RecursionError):  # (UnicodeDecodeError and JSONDecodeError: ValueErrors)
        return NOT_JSON
    if end != len(text) and text[end:].strip(_SPACE):
        return NOT_JSON
    return obj


def dumps(obj: Any) -> bytes:
    """
    C{json.dumps(obj, ensure_ascii=False, separators=(",", ":"))} in UTF-8,
    by orjson where that gives the same bytes.  It does not for numbers under
    1e-4 (orjson writes 1.5e-7 and 0.000015, the standard library 1.5e-07 and
    1.5e-05), nor for what orjson refuses (integers past 64 bits, lone
    surrogates, keys that are not strings): the standard library writes
    those, escaping every non-ASCII character when a lone surrogate cannot be
    UTF-8.  NaN and infinities, which no JSON parser gives and the standard
    library writes as NaN (not JSON), orjson writes as null.
    """
    try:
        out = orjson.dumps(obj)
    except orjson.JSONEncodeError:
        return _standard(obj)
    shape = out.translate(_DIGITS_AS_ZERO)  # (a string with such digits in it is also written by the library)
    if b"0e-" in shape or b"0.0000" in shape:
        return _standard(obj)
    return out


def _standard(obj: Any) -> bytes:
    try:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, separators=(",", ":")).encode("ascii")
