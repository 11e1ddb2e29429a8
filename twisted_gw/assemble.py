"""
Non-streaming answers built from a stream, without I/O.

llama.cpp keeps generating a non-streaming request for seconds after its
client has gone; a streaming one stops at once.  So for llama.cpp upstreams the
gateway asks for a stream and builds the JSON document the upstream would have
sent, in llama.cpp's own field order: C{choices}, C{created}, C{model},
C{system_fingerprint}, C{object}, C{usage}, C{id}, C{timings}.
"""

from __future__ import annotations

import json
from typing import Any, Optional

ASSEMBLED_PATHS = {b"/v1/chat/completions": True, b"/v1/completions": False}


def as_stream_request(doc: dict[str, Any]) -> bytes:
    """The client's request, asking for a stream with usage instead."""
    upstream = dict(doc)
    upstream["stream"] = True
    upstream["stream_options"] = {"include_usage": True}
    return json.dumps(upstream, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def with_usage_requested(doc: dict[str, Any]) -> bytes:
    """The client's streaming request, also asking for a usage chunk."""
    upstream = dict(doc)
    options = dict(doc["stream_options"]) if isinstance(doc.get("stream_options"), dict) else {}
    options["include_usage"] = True
    upstream["stream_options"] = options
    return json.dumps(upstream, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


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

    def feed(self, chunk: Any) -> None:
        if not isinstance(chunk, dict):
            return
        if isinstance(chunk.get("error"), dict):
            self.error = chunk["error"]
            return
        for key in ("created", "model", "system_fingerprint", "id"):
            if key in chunk and key not in self.head:
                self.head[key] = chunk[key]
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        if isinstance(chunk.get("timings"), dict):
            self.timings = chunk["timings"]
        for raw in chunk.get("choices") or ():
            if isinstance(raw, dict):
                self._feed_choice(raw)

    def _feed_choice(self, raw: dict[str, Any]) -> None:
        index = raw.get("index", 0) if isinstance(raw.get("index", 0), int) else 0
        choice = self.choices.setdefault(index, _Choice(index))
        if raw.get("finish_reason") is not None:
            choice.finish_reason = raw["finish_reason"]
        if not self.chat:
            if isinstance(raw.get("text"), str):
                choice.text.append(raw["text"])
                choice.saw_text = True
            if raw.get("logprobs") is not None:
                choice.logprobs = raw["logprobs"]
            return
        delta = raw.get("delta") or {}
        if not isinstance(delta, dict):
            return
        if isinstance(delta.get("role"), str):
            choice.role = delta["role"]
        if isinstance(delta.get("content"), str):
            choice.text.append(delta["content"])
            choice.saw_text = True
        if isinstance(delta.get("reasoning_content"), str):
            choice.reasoning.append(delta["reasoning_content"])
        for call in delta.get("tool_calls") or ():
            if isinstance(call, dict):
                self._feed_tool_call(choice, call)

    @staticmethod
    def _feed_tool_call(choice: _Choice, call: dict[str, Any]) -> None:
        index = call.get("index", len(choice.tool_calls))
        merged = choice.tool_calls.setdefault(index, {"type": "function", "function": {"name": "", "arguments": ""}})
        if call.get("id"):
            merged["id"] = call["id"]
        if call.get("type"):
            merged["type"] = call["type"]
        function = call.get("function") or {}
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
        obj: dict[str, Any] = {"error": self.error} if self.error is not None else self.document()
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
