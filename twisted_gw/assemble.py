"""
Non-streaming answers built from a stream, without I/O.

llama.cpp keeps generating a non-streaming request for seconds after its
client has gone; a streaming one stops at once.  So for llama.cpp upstreams the
gateway asks for a stream and builds the JSON document the upstream would have
sent, in llama.cpp's own field order: C{choices}, C{created}, C{model},
C{system_fingerprint}, C{object}, C{usage}, C{id}, C{timings}.
"""

from __future__ import annotations

from typing import Any, Optional

import orjson

from twisted_gw import fastjson

ASSEMBLED_PATHS = {b"/v1/chat/completions": True, b"/v1/completions": False}


def as_stream_request(doc: dict[str, Any]) -> bytes:
    """The client's request, asking for a stream with usage instead."""
    upstream = dict(doc)
    upstream["stream"] = True
    upstream["stream_options"] = {"include_usage": True}
    return fastjson.dumps(upstream)


def with_usage_requested(doc: dict[str, Any]) -> bytes:
    """The client's streaming request, also asking for a usage chunk."""
    upstream = dict(doc)
    options = dict(doc["stream_options"]) if isinstance(doc.get("stream_options"), dict) else {}
    options["include_usage"] = True
    upstream["stream_options"] = options
    return fastjson.dumps(upstream)


_HEAD = ("created", "model", "system_fingerprint", "id")

# A chat token chunk as llama.cpp writes it, up to its text; then the text's closing quote and the rest.
_TOKEN_PREFIX = b'{"choices":[{"finish_reason":null,"index":0,"delta":{"content":"'
_TOKEN_TEXT_END = b'"}}],'
# The fields a token chunk may have after its choices (each kept from the first chunk that has it).
_TOKEN_FIELDS = frozenset((*_HEAD, "object"))


class _Choice:
    def __init__(self, index: int) -> None:
        self.index = index
        self.role = "assistant"
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self.saw_text = False
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self.finish_reason: Optional[str] = None
        self.logprobs: Any = None


class Assembler:
    """Feed it the stream's chunks (parsed JSON); L{document} is the non-stream answer."""

    def __init__(self, chat: bool) -> None:
        self.chat = chat
        self.head: dict[str, Any] = {}
        self.choices: dict[int, _Choice] = {}
        self.usage: Optional[dict[str, Any]] = None
        self.timings: Optional[dict[str, Any]] = None
        self.error: Optional[dict[str, Any]] = None
        self.tokens = 0  # chunks that carried generated text (a token each, for an estimate)
        # The bytes after the text of a token chunk read whole (see L{feed_event}), from its closing quote on.
        self._token_tail: Optional[bytes] = None

    def feed_event(self, event: bytes) -> bool:
        """
        Take one event's data in: parsed and fed (L{feed}), or, for a chat
        token chunk whose bytes are those of one parsed before but for its
        text, only its text read (each token chunk of a llama.cpp stream
        repeats the same fields after its text, but for C{created}, the
        second it was written in).  False when it is not JSON.

        The shortcut gives what parsing would.  The chunk it was learnt from
        was parsed whole: one choice, index 0, no finish reason, a delta of
        only text, no other field but those kept once (L{_HEAD}, C{object}),
        no second C{choices}.  A chunk with the same bytes around a valid
        JSON string is the same document with another text; any other chunk
        is parsed.
        """
        tail = self._token_tail
        if tail is not None and event.startswith(_TOKEN_PREFIX) and event.endswith(tail):
            start = len(_TOKEN_PREFIX) - 1  # (its opening quote)
            end = len(event) - len(tail) + 1  # (after its closing quote)
            if end - start >= 2:
                try:
                    text = orjson.loads(event[start:end])
                except orjson.JSONDecodeError:  # (not one string: parsed below, which finds what it is)
                    text = None
                if type(text) is str:
                    choice = self.choices[0]
                    choice.text.append(text)
                    choice.saw_text = True
                    if text:
                        self.tokens += 1
                    return True
        chunk = fastjson.loads(event)
        if chunk is fastjson.NOT_JSON:
            return False
        self.feed(chunk)
        if self.chat and event.startswith(_TOKEN_PREFIX):  # (learnt again when the fields change: "created" does)
            self._token_tail = _token_tail(event, chunk) or tail
        return True

    def feed(self, chunk: Any) -> bool:
        """Take one chunk in; whether it carried generated text (counted in L{tokens})."""
        if not isinstance(chunk, dict):
            return False
        # (membership tests first: most chunks carry none of these)
        if "error" in chunk and isinstance(chunk["error"], dict):
            self.error = chunk["error"]
            return False
        head = self.head
        if len(head) < len(_HEAD):  # (every chunk repeats them; the first one that has each is kept)
            for key in _HEAD:
                if key in chunk and key not in head:
                    head[key] = chunk[key]
        if "usage" in chunk and isinstance(chunk["usage"], dict):
            self.usage = chunk["usage"]
        if "timings" in chunk and isinstance(chunk["timings"], dict):
            self.timings = chunk["timings"]
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            return False
        text = False
        for raw in choices:
            if isinstance(raw, dict) and self._feed_choice(raw):
                text = True
        if text:
            self.tokens += 1
        return text

    def _feed_choice(self, raw: dict[str, Any]) -> bool:
        index = raw.get("index", 0)
        if not isinstance(index, int):
            index = 0
        choice = self.choices.get(index)
        if choice is None:
            choice = self.choices[index] = _Choice(index)
        if raw.get("finish_reason") is not None:
            choice.finish_reason = raw["finish_reason"]
        if not self.chat:
            if raw.get("logprobs") is not None:
                choice.logprobs = raw["logprobs"]
            text = raw.get("text")
            if isinstance(text, str):
                choice.text.append(text)
                choice.saw_text = True
                return text != ""
            return False
        delta = raw.get("delta")
        if not isinstance(delta, dict):
            return False
        content = delta.get("content")
        if isinstance(content, str):
            choice.text.append(content)
            choice.saw_text = True
            if len(delta) == 1:  # the usual chunk: a token and nothing else
                return content != ""
        if "role" in delta and isinstance(delta["role"], str):
            choice.role = delta["role"]
        if "reasoning_content" in delta and isinstance(delta["reasoning_content"], str):
            choice.reasoning.append(delta["reasoning_content"])
        if "tool_calls" in delta and isinstance(delta["tool_calls"], list):
            for call in delta["tool_calls"]:
                if isinstance(call, dict):
                    self._feed_tool_call(choice, call)
        return isinstance(content, str) and content != ""

    @staticmethod
    def _feed_tool_call(choice: _Choice, call: dict[str, Any]) -> None:
        index = call.get("index")
        if not isinstance(index, int):
            index = len(choice.tool_calls)
        merged = choice.tool_calls.setdefault(index, {"type": "function", "function": {"name": "", "arguments": ""}})
        if call.get("id"):
            merged["id"] = call["id"]
        if call.get("type"):
            merged["type"] = call["type"]
        function = call.get("function")
        if not isinstance(function, dict):
            return
        if isinstance(function.get("name"), str):
            merged["function"]["name"] += function["name"]
        if isinstance(function.get("arguments"), str):
            merged["function"]["arguments"] += function["arguments"]

    def _choice_document(self, choice: _Choice) -> dict[str, Any]:
        if not self.chat:
            return {"text": "".join(choice.text), "index": choice.index, "logprobs": choice.logprobs,
                    "finish_reason": choice.finish_reason}
        message: dict[str, Any] = {"role": choice.role}
        text = "".join(choice.text)
        message["content"] = text if (choice.saw_text or not choice.tool_calls) else None
        if choice.reasoning:
            message["reasoning_content"] = "".join(choice.reasoning)
        if choice.tool_calls:
            message["tool_calls"] = [choice.tool_calls[i] for i in sorted(choice.tool_calls)]
        return {"finish_reason": choice.finish_reason, "index": choice.index, "message": message}

    def document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "choices": [self._choice_document(self.choices[i]) for i in sorted(self.choices)],
        }
        for key in ("created", "model", "system_fingerprint"):
            if key in self.head:
                doc[key] = self.head[key]
        doc["object"] = "chat.completion" if self.chat else "text_completion"
        if self.usage is not None:
            doc["usage"] = self.usage
        if "id" in self.head:
            doc["id"] = self.head["id"]
        if self.timings is not None:
            doc["timings"] = self.timings
        return doc

    def body(self) -> bytes:
        """The answer as llama.cpp serialises it: compact, UTF-8 as is."""
        return fastjson.dumps({"error": self.error} if self.error is not None else self.document())


def _token_tail(event: bytes, chunk: Any) -> Optional[bytes]:
    """
    For a chat token chunk C{event} parsed as C{chunk}: its bytes from its
    text's closing quote on, if it is a plain one (see L{Assembler.feed_event});
    else None.
    """
    if not (event.startswith(_TOKEN_PREFIX) and type(chunk) is dict and chunk.keys() - {"choices"} <= _TOKEN_FIELDS):
        return None
    choices = chunk.get("choices")
    if type(choices) is not list or len(choices) != 1:
        return None
    choice = choices[0]
    if type(choice) is not dict or choice.keys() != {"finish_reason", "index", "delta"}:
        return None
    delta = choice["delta"]
    if choice["finish_reason"] is not None or type(choice["index"]) is not int or choice["index"] != 0:
        return None
    if type(delta) is not dict or delta.keys() != {"content"} or type(delta["content"]) is not str:
        return None
    # the text's closing quote: the first candidate after which the text reads as parsed
    at = event.find(_TOKEN_TEXT_END, len(_TOKEN_PREFIX))
    while at >= 0:
        try:
            text = orjson.loads(event[len(_TOKEN_PREFIX) - 1:at + 1])
        except orjson.JSONDecodeError:
            text = None
        if text == delta["content"]:
            break
        at = event.find(_TOKEN_TEXT_END, at + 1)
    else:
        return None
    # what follows the choices, read alone: only fields kept once (a second "choices", however its name is
    # escaped, would be the one a parser keeps)
    rest = fastjson.loads(b"{" + event[at + len(_TOKEN_TEXT_END):])
    if type(rest) is not dict or not rest.keys() <= _TOKEN_FIELDS:
        return None
    return event[at:]
