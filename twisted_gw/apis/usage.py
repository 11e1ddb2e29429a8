"""
Token usage read from what an upstream sent, without I/O: the C{usage} of
OpenAI's chat, completions and embeddings, of the Responses API and of
Anthropic's Messages API, llama.cpp's C{timings}, or an estimate for a stream
cut short.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens of one request, and where the numbers came from."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    source: str = "none"  # "usage", "timings", "estimate" or "none"


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """Where usage may be: the object, or the message (Messages' C{message_start}) or response (Responses' events)."""
    found = [obj]
    for name in ("message", "response"):
        inner = obj.get(name)
        if isinstance(inner, dict):
            found.append(inner)
    return found


def from_usage(usage: dict[str, Any]) -> Optional[Usage]:
    """
    One C{usage} object, in any API's shape: OpenAI's C{prompt_tokens} and
    C{completion_tokens} (chat, completions, embeddings); the Responses API's
    C{input_tokens} (the cached ones included), told by its C{total_tokens} or
    C{input_tokens_details}; Anthropic's C{input_tokens}, which leaves out
    C{cache_read_input_tokens} and C{cache_creation_input_tokens}, both billed too.
    """
    if "prompt_tokens" in usage or "completion_tokens" in usage:
        return Usage(_int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens")), "usage")
    if "input_tokens" in usage or "output_tokens" in usage:
        prompt = _int(usage.get("input_tokens"))
        if "total_tokens" not in usage and "input_tokens_details" not in usage:
            prompt += _int(usage.get("cache_read_input_tokens")) + _int(usage.get("cache_creation_input_tokens"))
        return Usage(prompt, _int(usage.get("output_tokens")), "usage")
    return None


def cached_tokens(usage: dict[str, Any]) -> Optional[int]:
    """The cached prompt tokens a C{usage} tells, in any API's shape, or None."""
    if "cache_read_input_tokens" in usage:
        return _int(usage["cache_read_input_tokens"])
    for details in ("input_tokens_details", "prompt_tokens_details"):
        found = usage.get(details)
        if isinstance(found, dict) and "cached_tokens" in found:
            return _int(found["cached_tokens"])
    return None


def from_timings(timings: dict[str, Any]) -> Optional[Usage]:
    """llama.cpp's C{timings}: prompt tokens are C{prompt_n + cache_n} (the cached prefix counts too)."""
    if "prompt_n" in timings or "predicted_n" in timings:
        return Usage(
            _int(timings.get("prompt_n")) + _int(timings.get("cache_n")), _int(timings.get("predicted_n")), "timings"
        )
    return None


def usage_from_object(obj: Any) -> Optional[Usage]:
    """
    Usage from one response object (a stream event or a whole JSON response):
    its C{usage} if present, else llama.cpp's C{timings}.
    """
    if not isinstance(obj, dict):
        return None
    timings = None
    for container in _containers(obj):
        usage = container.get("usage")
        if isinstance(usage, dict):
            found = from_usage(usage)
            if found is not None:
                return found
        if timings is None and isinstance(container.get("timings"), dict):
            timings = from_timings(container["timings"])
    return timings


# An event that carries generated text: a string "content" (chat) or "text" (completions, Messages' text deltas),
# or for the Responses API a string "delta" (response.output_text.delta; its *.done events repeat the whole text).
_CONTENT = re.compile(rb'"(?:content|text)"\s*:\s*"[^"]')
_DELTA = re.compile(rb'"delta"\s*:\s*"[^"]')


class UsageTracker:
    """
    Watches a response (stream events or a JSON body) of one API (see
    L{twisted_gw.apis.kinds.api_of}) for its token usage: C{usage} first, then
    llama.cpp's C{timings}, and for a stream cut short before either, the
    number of content events relayed (llama.cpp sends one token an event),
    flagged as an estimate.  A Messages stream tells its usage in parts
    (input in C{message_start}, output in C{message_delta}): the fields are
    merged, the latest value of each kept.
    """

    __slots__ = ("_fields", "_from_timings", "_from_usage", "_text", "_text_key", "cached", "content_chunks")

    def __init__(self, api: str = "chat") -> None:
        self._from_usage: Optional[Usage] = None
        self._from_timings: Optional[Usage] = None
        self._fields: dict[str, Any] = {}
        self.content_chunks = 0
        self.cached: Optional[int] = None  # prompt tokens the upstream had in its cache, when it says
        self._text_key: tuple[bytes, ...]
        if api == "responses":
            self._text, self._text_key = _DELTA, (b'"delta"',)
        else:
            self._text, self._text_key = _CONTENT, (b'"content"', b'"text"')

    def see_object(self, obj: Any) -> None:
        if not isinstance(obj, dict):
            return
        for container in _containers(obj):
            usage = container.get("usage")
            if isinstance(usage, dict):
                told = from_usage(usage)
                if told is not None and ("input_tokens" in usage or "output_tokens" in usage):
                    self._fields.update(usage)  # (Messages' parts; whole objects on other APIs)
                    told = from_usage(self._fields)
                if told is not None:
                    self._from_usage = told
                if self.cached is None:
                    self.cached = cached_tokens(usage)
            timings = container.get("timings")
            if isinstance(timings, dict):
                found = from_timings(timings)
                if found is not None:
                    self._from_timings = found
                if "cache_n" in timings:  # (llama.cpp's own count wins over a usage field)
                    self.cached = _int(timings["cache_n"])

    def see_event(self, data: bytes) -> None:
        """An event as relayed: counted, and parsed only if it can carry numbers."""
        if any(key in data for key in self._text_key) and self._text.search(data):
            self.content_chunks += 1
        # Parsing JSON costs more than relaying: only the events that can carry
        # numbers are parsed (llama.cpp puts them on the last one or two).
        if b'"usage"' not in data and b'"timings"' not in data:
            return
        try:
            obj = json.loads(data)
        except ValueError:
            return
        self.see_object(obj)

    def see_body(self, body: bytes) -> None:
        try:
            self.see_object(json.loads(body))
        except ValueError:
            pass

    @property
    def usage(self) -> Usage:
        told = self._from_usage or self._from_timings
        if told is None:
            return Usage(0, self.content_chunks, "estimate") if self.content_chunks else Usage()
        if told.completion_tokens < self.content_chunks:
            # told before the output ended (Messages' message_start), and the stream cut before the rest
            return Usage(told.prompt_tokens, self.content_chunks, "estimate")
        return told
