"""twisted_gw.fastjson: json.loads' and json.dumps' results, whichever of orjson and the standard library gives them."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from twisted_gw.fastjson import NOT_JSON, dumps, loads


class LoadsTests(SynchronousTestCase):
    @given(st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
        lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
        max_leaves=12,
    ), st.sampled_from(["", " ", "\t", " \r\n"]))
    def test_what_json_loads_reads(self, obj: object, space: str) -> None:
        for text in (json.dumps(obj), json.dumps(obj, ensure_ascii=False, separators=(",", ":"))):
            data = (space + text + space).encode("utf-8")
            self.assertEqual(loads(data), json.loads(data))

    @given(st.binary(max_size=60))
    def test_not_json_where_json_loads_fails(self, data: bytes) -> None:
        try:
            expected = json.loads(data.decode("utf-8"))
        except ValueError:
            self.assertIs(loads(data), NOT_JSON)
        else:
            self.assertEqual(loads(data), expected)

    def test_examples(self) -> None:
        self.assertEqual(loads(b'{"a": [1, "\\u00e9"]}'), {"a": [1, "\u00e9"]})
        # what orjson refuses and json.loads takes
        for data in (b'{"a": NaN}', b"[Infinity, -Infinity]", b"123456789012345678901234567890", b'"\\ud800"'):
            self.assertEqual(repr(loads(data)), repr(json.loads(data)), data)
        for data in (b"", b" ", b"[DONE]", b'{"a": 1} x', b'{"a": 1}{}', b"\xff", b'{"a": 1', b"[" * 100_000):
            self.assertIs(loads(data), NOT_JSON, data)

    def test_without_constants(self) -> None:
        for data in (b'{"a": NaN}', b"[Infinity]", b"-Infinity", b'{"a": [1, NaN]}'):
            self.assertIs(loads(data, constants=False), NOT_JSON, data)
        self.assertEqual(loads(b'{"a": "NaN", "b": 1e400}', constants=False), {"a": "NaN", "b": float("inf")})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(alphabet=st.characters(blacklist_categories=["Cs"])),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=16,
)


class DumpsTests(SynchronousTestCase):
    @given(json_values)
    def test_the_standard_librarys_bytes(self, obj: object) -> None:
        self.assertEqual(dumps(obj), json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode())

    def test_examples(self) -> None:
        for obj in ({"a": [1.5e-07, 1.5e-05, 0.0001, 1e16, -0.0, 2**64 - 1, 2**64]}, "\x00\x1f\x7f\u2028 é",
                    {1: "int key"}, [1e-300, 1e300, 0.1, 3000.0]):
            self.assertEqual(dumps(obj), json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode())
        self.assertEqual(dumps([float("nan")]), b"[null]")
        # a lone surrogate (json.loads reads "\ud800") has no UTF-8: escaped, as every non-ASCII character then
        self.assertEqual(dumps(["\ud800", "é"]), b'["\\ud800","\\u00e9"]')
