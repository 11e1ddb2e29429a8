"""The SSE parser and usage extraction, without I/O."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from twisted_gw.apis.assemble import Assembler
from twisted_gw.apis.sse import SSEParser, comment, queue_position_comment
from twisted_gw.apis.usage import Usage, UsageTracker, usage_from_object

payloads = st.text(alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=["Cs"]), max_size=40)


def feed_in_pieces(stream: bytes, cuts: list[int]) -> list[bytes]:
    parser = SSEParser()
    events: list[bytes] = []
    last = 0
    for cut in [*sorted({c % (len(stream) + 1) for c in cuts}), len(stream)]:
        events.extend(parser.feed(stream[last:cut]))
        last = cut
    return events


class ParserTests(SynchronousTestCase):
    def test_events_comments_and_line_endings(self) -> None:
        stream = b": ping\n\ndata: one\r\n\r\ndata: two\rdata: lines\r\rid: 5\nevent: x\ndata:three\n\n"
        self.assertEqual(SSEParser().feed(stream), [b"one", b"two\nlines", b"three"])

    def test_incomplete_event_waits(self) -> None:
        parser = SSEParser()
        self.assertEqual(parser.feed(b"data: {\"a\""), [])
        self.assertEqual(parser.feed(b": 1}\n"), [])
        self.assertEqual(parser.feed(b"\n"), [b'{"a": 1}'])

    def test_crlf_split_between_chunks_is_one_line_end(self) -> None:
        parser = SSEParser()
        self.assertEqual(parser.feed(b"data: a\r"), [])
        self.assertEqual(parser.feed(b"\n\r\n"), [b"a"])

    @given(st.lists(payloads, max_size=8), st.lists(st.integers(min_value=0), max_size=12),
           st.sampled_from([b"\n", b"\r\n", b"\r"]))
    def test_any_split_gives_the_same_events(self, datas: list[str], cuts: list[int], eol: bytes) -> None:
        stream = b"".join(b"data: " + d.encode() + eol + eol + b":c" + eol for d in datas)
        expected = [d.encode() for d in datas]
        self.assertEqual(SSEParser().feed(stream), expected)
        self.assertEqual(feed_in_pieces(stream, cuts), expected)

    @given(st.binary(max_size=300), st.lists(st.integers(min_value=0), max_size=8))
    def test_arbitrary_bytes_never_raise(self, stream: bytes, cuts: list[int]) -> None:
        whole = SSEParser().feed(stream)
        self.assertEqual(feed_in_pieces(stream, cuts), whole)
        tracker = UsageTracker()
        for event in whole:
            tracker.see_event(event)
        self.assertIsInstance(tracker.usage, Usage)

    def test_comments(self) -> None:
        self.assertEqual(queue_position_comment(3), b": queue position=3\n\n")
        self.assertEqual(comment("a\nb"), b": a\n: b\n\n")
        self.assertEqual(SSEParser().feed(comment("x") + b"data: y\n\n"), [b"y"])


class UsageTests(SynchronousTestCase):
    def test_usage_wins_over_timings(self) -> None:
        obj = {"usage": {"prompt_tokens": 10, "completion_tokens": 4},
               "timings": {"prompt_n": 1, "cache_n": 2, "predicted_n": 3}}
        self.assertEqual(usage_from_object(obj), Usage(10, 4, "usage"))

    def test_timings_count_the_cached_prefix(self) -> None:
        obj = {"timings": {"prompt_n": 1, "cache_n": 121, "predicted_n": 30}}
        self.assertEqual(usage_from_object(obj), Usage(122, 30, "timings"))

    def test_null_or_odd_values(self) -> None:
        self.assertIsNone(usage_from_object({"usage": None}))
        self.assertIsNone(usage_from_object([1, 2]))
        self.assertEqual(usage_from_object({"usage": {"prompt_tokens": "x", "completion_tokens": -1}}),
                         Usage(0, 0, "usage"))

    def test_tracker_prefers_usage_seen_anywhere_in_the_stream(self) -> None:
        tracker = UsageTracker()
        tracker.see_event(json.dumps({"choices": [], "timings": {"prompt_n": 5, "predicted_n": 2}}).encode())
        self.assertEqual(tracker.usage, Usage(5, 2, "timings"))
        tracker.see_event(json.dumps({"choices": [], "usage": {"prompt_tokens": 6, "completion_tokens": 2}}).encode())
        self.assertEqual(tracker.usage, Usage(6, 2, "usage"))
        tracker.see_event(b"[DONE]")
        tracker.see_event(b'{"usage": broken')
        self.assertEqual(tracker.usage, Usage(6, 2, "usage"))

    def test_what_the_assembler_read_counts_as_the_events_seen_raw(self) -> None:
        events = [json.dumps(e).encode() for e in (
            {"choices": [{"delta": {"role": "assistant", "content": "Hi"}}]},
            {"choices": [{"delta": {"content": ""}}]},
            {"choices": [{"delta": {"reasoning_content": "hmm"}}]},
            {"choices": [{"delta": {"content": " there"}}]},
            {"choices": [{"delta": {}, "finish_reason": "stop"}], "timings": {"prompt_n": 4, "predicted_n": 2}},
            {"choices": [], "usage": {"prompt_tokens": 6, "completion_tokens": 2}},
        )]
        raw, assembled = UsageTracker(), UsageTracker()
        assembler = Assembler(chat=True)
        for event in events:
            raw.see_event(event)
            assembler.feed(json.loads(event))
        # as the proxy hands it over (twisted_gw/proxy.py, Proxy._assemble)
        assembled.content_chunks += assembler.tokens
        assembled.see_object({"usage": assembler.usage, "timings": assembler.timings})
        self.assertEqual((raw.content_chunks, raw.usage), (2, Usage(6, 2, "usage")))
        self.assertEqual((assembled.content_chunks, assembled.usage), (2, Usage(6, 2, "usage")))
        timings_only = UsageTracker()
        timings_only.see_object({"usage": None, "timings": assembler.timings})
        self.assertEqual(timings_only.usage, Usage(4, 2, "timings"))

    def test_body(self) -> None:
        tracker = UsageTracker()
        tracker.see_body(b'{"usage": {"prompt_tokens": 3, "completion_tokens": 9}}')
        self.assertEqual(tracker.usage, Usage(3, 9, "usage"))
        empty = UsageTracker()
        empty.see_body(b"<html>")
        self.assertEqual(empty.usage, Usage())
