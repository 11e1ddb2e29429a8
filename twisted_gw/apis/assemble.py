"""
Non-streaming answers built from a stream, without I/O.

llama.cpp builds before 2026-12 keep generating a non-streaming request for
seconds after its client has gone; a streaming one stops at once.  So for
llama.cpp upstreams the gateway asks for a stream and builds the JSON document
the upstream would have sent, in llama.cpp's own field order: C{choices},
C{created}, C{model}, C{system_fingerprint}, C{object}, C{usage}, C{id},
C{timings}.
"""

from __future__ import annotations

import json
from typing import Any, Optional


def compact(doc: Any) -> bytes:
    """JSON as llama.cpp writes it: no spaces, UTF-8 as is (escaped where it cannot be: a lone surrogate)."""
    try:
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(doc, separators=(",", ":")).encode("ascii")


ASSEMBLED_PATHS = {b"/v1/chat/completions": True, b"/v1/completions": False}


def as_stream_request(doc: dict[str, Any]) -> bytes:
    """The client's request, asking for a stream with usage instead."""
    upstream = dict(doc)
    upstream["stream"] = True
    upstream["stream_options"] = {"include_usage": True}
    return compact(upstream)


def with_usage_requested(doc: dict[str, Any]) -> bytes:
    """The client's streaming request, also asking for a usage chunk."""
    upstream = dict(doc)
    options = dict(doc["stream_options"]) if isinstance(doc.get("stream_options"), dict) else {}
    options["include_usage"] = True
    upstream["stream_options"] = options
    return compact(upstream)


_HEAD = ("created", "model", "system_fingerprint", "id")

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

    def feed_event(self, event: bytes) -> bool:
        """Take one event's data in (parsed, then L{feed}); False when it is not JSON."""
        try:
            chunk = json.loads(event)
        except ValueError:
            return False
        self.feed(chunk)
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
        return compact({"error": self.error} if self.error is not None else self.document())
