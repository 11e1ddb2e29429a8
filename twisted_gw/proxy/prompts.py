"""
Billing the prompt of a request whose client left (or that was interrupted)
after it was sent upstream, before the upstream told its usage: the upstream
read the prompt all the same.  Counted off the request path, once the
request is over: by a llama.cpp upstream itself (C{/apply-template} and
C{/tokenize}, or C{/v1/messages/count_tokens} for Messages), else estimated
from the body's text.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import attrs
from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.logger import Logger

from twisted_gw.apis.kinds import GENERATIONS
from twisted_gw.apis.prompts import chat_messages, estimate_tokens, plain_texts
from twisted_gw.apis.usage import Usage
from twisted_gw.proxy.exchange import Exchange
from twisted_gw.upstream import Upstream

log = Logger(namespace="llmgw.proxy")

# Counts asked of the upstreams at once (a crowd of clients leaving together must not flood them).
CONCURRENT_COUNTS = 4
COUNT_TIMEOUT = 10.0


def needs_prompt_count(ex: Exchange, usage: Usage) -> bool:
    """A generation that reached an upstream, ended by its client leaving or an interruption, its prompt untold."""
    return (
        ex.sent_upstream
        and (ex.cancelled or ex.interrupted is not None)
        and usage.prompt_tokens == 0
        and ex.request.path in GENERATIONS
        and ex.info.is_object
    )


class _Uncountable(Exception):
    pass


async def _answer(d: Deferred[tuple[int, Any]], field: str) -> Any:
    code, doc = await d
    if code != 200 or not isinstance(doc, dict) or field not in doc:
        raise _Uncountable(f"the upstream answered {code}")
    return doc[field]


async def count_on_llamacpp(upstream: Upstream, doc: dict[str, Any], api: str) -> int:
    """The prompt's tokens as llama.cpp counts them (raises when it cannot)."""
    if api == "messages":
        request = {k: doc[k] for k in ("model", "messages", "system", "tools") if k in doc}
        found = await _answer(upstream.post_json(b"/v1/messages/count_tokens", request), "input_tokens")
        if not isinstance(found, int):
            raise _Uncountable("count_tokens answered no number")
        return found
    if api == "chat":  # (the body itself: its tools are templated too)
        texts = [await _answer(upstream.post_json(b"/apply-template", {**doc, "stream": False}), "prompt")]
    elif (messages := chat_messages(doc, api)) is not None:
        texts = [await _answer(upstream.post_json(b"/apply-template", {"messages": messages}), "prompt")]
    else:
        texts = plain_texts(doc, api) or []
    total = 0
    for text in texts:
        tokens = await _answer(upstream.post_json(b"/tokenize", {"content": text, "add_special": True}), "tokens")
        if not isinstance(tokens, list):
            raise _Uncountable("tokenize answered no tokens")
        total += len(tokens)
    return total


@attrs.define
class PromptCounter:
    """Counts prompts for L{needs_prompt_count}, a few at a time."""

    limit: DeferredSemaphore = attrs.Factory(lambda: DeferredSemaphore(CONCURRENT_COUNTS))

    def count(self, ex: Exchange) -> Deferred[tuple[int, str]]:
        """The prompt's tokens and how they were found: C{tokenize} (the upstream counted) or C{estimate}."""
        return self.limit.run(lambda: Deferred.fromCoroutine(self._count(ex)))

    async def _count(self, ex: Exchange) -> tuple[int, str]:
        doc = json.loads(ex.request.body)
        upstream: Optional[Upstream] = ex.upstream
        if upstream is not None and upstream.llamacpp is not False:
            try:
                counting = Deferred.fromCoroutine(self._ask(upstream, doc, ex.api))
                found = await counting.addTimeout(COUNT_TIMEOUT, upstream.reactor)
                if found is not None:
                    return found, "tokenize"
            except Exception as e:
                log.warn("{user}: the prompt of a request that ended early could not be counted by {upstream} "
                         "({error}); estimated from its text", user=ex.user, upstream=upstream.base_url, error=e)
        return estimate_tokens(doc, ex.api), "estimate"

    @staticmethod
    async def _ask(upstream: Upstream, doc: dict[str, Any], api: str) -> Optional[int]:
        """Counted by the upstream if it is llama.cpp (asked once, if not known yet), else None."""
        if not await upstream.is_llamacpp():
            return None
        return await count_on_llamacpp(upstream, doc, api)
