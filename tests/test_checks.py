"""The request checks, with arbitrary input: only GatewayError may come out."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from twisted_gw.apis.checks import BodyInfo, check_uri, forward_headers, inspect_body, parse_object
from twisted_gw.apis.errors import GatewayError

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


class InspectBodyTests(SynchronousTestCase):
    @given(st.dictionaries(st.text(max_size=10), json_values, max_size=6), json_values)
    def test_any_json_object(self, doc: dict[str, object], stream: object) -> None:
        doc["stream"] = stream
        body = json.dumps(doc).encode()
        try:
            info = inspect_body(body, b"application/json")
        except GatewayError as e:
            self.assertEqual(e.status, 400)
            self.assertNotIsInstance(stream, bool)
            self.assertIsNotNone(stream)
            return
        self.assertEqual(info.stream, stream is True)
        self.assertTrue(info.is_object)
        self.assertEqual(parse_object(body), doc)

    @given(st.binary(max_size=200), st.sampled_from([None, b"application/json", b"text/plain", b"a/b+json"]))
    def test_any_bytes(self, body: bytes, content_type: bytes | None) -> None:
        try:
            info = inspect_body(body, content_type)
        except GatewayError as e:
            self.assertEqual(e.status, 400)
            self.assertIn(e.code, ("invalid_json", "invalid_encoding", "invalid_type"))
        else:
            self.assertIsInstance(info, BodyInfo)

    def test_nan_and_infinity_are_not_json(self) -> None:
        for body in (b'{"temperature": NaN}', b'{"a": [Infinity]}', b'{"a": -Infinity}'):
            with self.assertRaises(GatewayError) as raised:
                inspect_body(body, b"application/json")
            self.assertEqual((raised.exception.status, raised.exception.code), (400, "invalid_json"))
            self.assertIn("is not JSON", str(raised.exception))
        self.assertTrue(inspect_body(b'{"a": "NaN"}', None).is_object)
        self.assertEqual(parse_object(b'{"a": "NaN"}'), {"a": "NaN"})

    def test_the_error_says_why(self) -> None:
        for body, code, words in ((b'{"a": 1', "invalid_json", "Expecting"), (b"\xff{}", "invalid_encoding", "UTF-8")):
            with self.assertRaises(GatewayError) as raised:
                inspect_body(body, b"application/json")
            self.assertEqual(raised.exception.code, code)
            self.assertIn(words, str(raised.exception))

    def test_non_json_content_passes_untouched(self) -> None:
        self.assertEqual(inspect_body(b"--boundary\r\n", b"multipart/form-data; boundary=x"), BodyInfo())


class CheckUriTests(SynchronousTestCase):
    def test_accepted(self) -> None:
        for uri in (b"/v1/models", b"/v1/chat/completions?x=1&y=%2F", b"/v1", b"/v1/models/gemma-3.gguf",
                    b"/v1/.well-known/x"):
            self.assertEqual(check_uri(uri), uri)

    def test_refused(self) -> None:
        for uri in (b"/v1/../health", b"/v1/./x", b"/v1/a%2fb", b"/v1/%2E%2E/x", b"/v1/a\\b", b"/v2/x",
                    b"/health", b"/v1/\xff", b"/v1/a b", b"/v1/x/..", b"/v1/\x7f", b"/v1/x?a=\x00"):
            with self.assertRaises(GatewayError, msg=uri):
                check_uri(uri)

    @given(st.binary(max_size=60))
    def test_any_bytes(self, tail: bytes) -> None:
        uri = b"/v1/" + tail
        try:
            self.assertEqual(check_uri(uri), uri)
        except GatewayError as e:
            self.assertIn(e.status, (400, 404))
        else:
            path = uri.partition(b"?")[0]
            self.assertNotIn(b"..", path.split(b"/"))
            self.assertTrue(all(0x21 <= c <= 0x7E for c in uri))
            self.assertNotIn(b"%2f", path.lower())


class ForwardHeadersTests(SynchronousTestCase):
    def test_connection_named_headers_are_dropped(self) -> None:
        raw = [(b"X-A", [b"1"]), (b"X-B", [b"2"]), (b"Connection", [b"x-b, close"]), (b"Host", [b"h"])]
        kept = forward_headers(raw, [b"x-b, close"], frozenset({b"connection", b"host"}))
        self.assertEqual(kept, [(b"X-A", [b"1"])])
