"""The SSE parser and usage extraction, without I/O."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from twisted_gw.apis.assemble import Assembler
from twisted_gw.apis.errors import GatewayError
from twisted_gw.apis.kinds import anthropic_dialect, api_of, takes_a_place
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


def events(*objects: dict[str, Any]) -> list[bytes]:
    return [json.dumps(o, separators=(",", ":")).encode() for o in objects]


class EveryAPIUsageTests(SynchronousTestCase):
    """The usage shapes llama-server sends on each API (captured from a real one; ids and model left out)."""

    def test_messages_non_stream_bills_the_cached_prefix(self) -> None:
        usage = {"cache_read_input_tokens": 21, "input_tokens": 5, "output_tokens": 4}
        body = {"type": "message", "role": "assistant", "content": [{"type": "text", "text": "Hi"}], "usage": usage}
        self.assertEqual(usage_from_object(body), Usage(26, 4, "usage"))
        usage["cache_creation_input_tokens"] = 3  # (Anthropic's own API: created cache is input too)
        self.assertEqual(usage_from_object(body), Usage(29, 4, "usage"))

    def test_messages_stream_merges_start_and_delta(self) -> None:
        tracker = UsageTracker("messages")
        for event in events(
            {"type": "message_start", "message": {"id": "m", "type": "message", "role": "assistant", "content": [],
                                                  "usage": {"input_tokens": 5, "cache_read_input_tokens": 21,
                                                            "output_tokens": 0}}},
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hel"}},
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "lo"}},
        ):
            tracker.see_event(event)
        self.assertEqual(tracker.content_chunks, 2)
        # cut here: the prompt is known, the output counted from the deltas relayed
        self.assertEqual(tracker.usage, Usage(26, 2, "estimate"))
        for event in events(
            {"type": "content_block_stop", "index": 0},
            {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
             "usage": {"output_tokens": 4}},
            {"type": "message_stop"},
        ):
            tracker.see_event(event)
        self.assertEqual(tracker.usage, Usage(26, 4, "usage"))

    def test_responses_input_tokens_already_hold_the_cached_ones(self) -> None:
        usage = {"input_tokens": 26, "output_tokens": 4, "total_tokens": 30,
                 "input_tokens_details": {"cached_tokens": 21}}
        self.assertEqual(usage_from_object({"object": "response", "usage": usage}), Usage(26, 4, "usage"))
        tracker = UsageTracker("responses")
        for event in events(
            {"type": "response.created", "response": {"object": "response", "status": "in_progress"}},
            {"type": "response.output_text.delta", "item_id": "i", "output_index": 0, "content_index": 0,
             "delta": "Hel"},
            {"type": "response.output_text.delta", "item_id": "i", "output_index": 0, "content_index": 0,
             "delta": "lo"},
            {"type": "response.output_text.done", "item_id": "i", "output_index": 0, "content_index": 0,
             "text": "Hello"},
        ):
            tracker.see_event(event)
        self.assertEqual(tracker.usage, Usage(0, 2, "estimate"))  # (the *.done event repeats the text: not a token)
        tracker.see_event(events({"type": "response.completed", "response": {
            "object": "response", "status": "completed", "usage": usage}})[0])
        self.assertEqual(tracker.usage, Usage(26, 4, "usage"))

    def test_responses_timings_when_there_is_no_usage(self) -> None:
        tracker = UsageTracker("responses")
        tracker.see_event(events({"type": "response.completed", "response": {"object": "response"},
                                  "timings": {"prompt_n": 5, "cache_n": 21, "predicted_n": 4}})[0])
        self.assertEqual(tracker.usage, Usage(26, 4, "timings"))

    def test_embeddings(self) -> None:
        body = {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.1]}],
                "usage": {"prompt_tokens": 7, "total_tokens": 7}}
        self.assertEqual(usage_from_object(body), Usage(7, 0, "usage"))


class KindsTests(SynchronousTestCase):
    def test_paths(self) -> None:
        self.assertEqual([api_of(p) for p in (b"/v1/chat/completions", b"/v1/completions", b"/v1/responses",
                                              b"/v1/messages", b"/v1/embeddings", b"/v1/messages/count_tokens",
                                              b"/v1/models", b"/v1/rerank")],
                         ["chat", "completions", "responses", "messages", "embeddings", "count_tokens", "models",
                          "other"])
        self.assertFalse(takes_a_place(b"POST", b"/v1/messages/count_tokens"))
        self.assertFalse(takes_a_place(b"GET", b"/v1/models"))
        self.assertTrue(takes_a_place(b"POST", b"/v1/messages"))
        self.assertTrue(anthropic_dialect(b"/v1/messages/count_tokens"))
        self.assertFalse(anthropic_dialect(b"/v1/messagesx"))

    def test_anthropic_error_types_by_status(self) -> None:
        expected = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                    502: "api_error", 503: "overloaded_error", 504: "timeout_error", 418: "invalid_request_error",
                    507: "api_error"}
        for status, kind in expected.items():
            self.assertEqual(json.loads(GatewayError(status, "why").body(anthropic=True)),
                             {"type": "error", "error": {"type": kind, "message": "why"}})
        self.assertEqual(json.loads(GatewayError(429, "why", "rate_limit_error", "queue_full").body()),
                         {"error": {"message": "why", "type": "rate_limit_error", "code": "queue_full"}})
