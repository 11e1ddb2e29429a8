"""
A request's prompt, read from its body without I/O, for billing a request
whose client left before the upstream told its usage: the chat messages to
template (chat, Responses and Messages bodies, in chat form), the plain texts
to tokenize (completions, embeddings), and an estimate from the text alone for
upstreams that cannot count.
"""

from __future__ import annotations

import json
import math
from typing import Any, Optional

# What an upstream that cannot tokenize is billed: about 4 characters a token, OpenAI's rule of thumb
# for English text (help.openai.com, "What are tokens and how to count them").
CHARS_PER_TOKEN = 4


def _text(content: Any, separator: str = "\n") -> str:
    """
    The text of a message's content: a string, or the text of its parts
    (Anthropic's and Responses' blocks), one a line as llama.cpp joins them.
    """
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return separator.join(_text(part) for part in content)
    if isinstance(content, dict):
        for key in ("text", "content", "output"):  # (text blocks, tool results, function call outputs)
            if key in content:
                return _text(content[key])
    return ""


def _message(role: Any, content: Any, separator: str = "\n") -> dict[str, str]:
    return {"role": role if isinstance(role, str) else "user", "content": _text(content, separator)}


def _item(item: dict[str, Any]) -> dict[str, str]:
    """A Responses input item as a chat message (a function call's output is a tool message)."""
    if item.get("type") == "function_call_output":
        return _message("tool", item.get("output"))
    return _message(item.get("role"), item.get("content"))


def chat_messages(doc: dict[str, Any], api: str) -> Optional[list[dict[str, str]]]:
    """
    The conversation of a chat-shaped request as plain chat messages (what
    llama.cpp's C{/apply-template} takes), or None for one that is not chat-shaped.
    """
    if api == "chat":
        messages = doc.get("messages")
        if not isinstance(messages, list):
            return None
        return [_message(m.get("role"), m.get("content")) for m in messages if isinstance(m, dict)]
    if api == "messages":
        # (llama.cpp runs the system blocks together)
        found = [] if doc.get("system") is None else [_message("system", doc["system"], "")]
        messages = doc.get("messages")
        if not isinstance(messages, list):
            return None
        return found + [_message(m.get("role"), m.get("content")) for m in messages if isinstance(m, dict)]
    if api == "responses":
        found = [_message("system", doc["instructions"])] if isinstance(doc.get("instructions"), str) else []
        given = doc.get("input")
        if isinstance(given, str):
            return [*found, _message("user", given)]
        if isinstance(given, list):
            return found + [_item(m) for m in given if isinstance(m, dict)]
        return None
    return None


def plain_texts(doc: dict[str, Any], api: str) -> Optional[list[str]]:
    """The texts a completions or embeddings request has the upstream read, or None (token ids are not counted)."""
    given = doc.get("prompt") if api == "completions" else doc.get("input") if api == "embeddings" else None
    if isinstance(given, str):
        return [given]
    if isinstance(given, list) and given and all(isinstance(t, str) for t in given):
        return list(given)
    return None


def estimate_tokens(doc: dict[str, Any], api: str) -> int:
    """About how many tokens the prompt is, from the length of its text."""
    messages = chat_messages(doc, api)
    if messages is not None:
        chars = sum(len(m["content"]) + len(m["role"]) for m in messages)
    else:
        chars = sum(len(t) for t in plain_texts(doc, api) or [])
    return math.ceil(chars / CHARS_PER_TOKEN)


def routing_text(doc: dict[str, Any], api: str) -> Optional[str]:
    """
    The text a generation's prompt begins with as an upstream sees it, for
    cache-aware routing: the tools, then the messages in order (system first),
    or the plain prompt; None for a request without one.
    """
    messages = chat_messages(doc, api)
    if messages is not None:
        tools = doc.get("tools")
        head = json.dumps(tools, sort_keys=True) + "\n" if tools else ""
        return head + "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
    texts = plain_texts(doc, api) if api == "completions" else None
    return texts[0] if texts else None
