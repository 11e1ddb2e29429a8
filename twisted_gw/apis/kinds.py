"""
Which API a C{/v1} request speaks, from its path: what it is billed as, whether
it generates (and so takes a place), and in whose dialect its errors are told.
"""

from __future__ import annotations

# The generating APIs by path, with the name the ledger and the access log give them.
GENERATIONS = {
    b"/v1/chat/completions": "chat",
    b"/v1/completions": "completions",
    b"/v1/responses": "responses",
    b"/v1/messages": "messages",
    b"/v1/embeddings": "embeddings",
}

COUNT_TOKENS = b"/v1/messages/count_tokens"

# Paths whose POST generates nothing: they never wait behind generations and bill nothing.
NOT_GENERATIONS = {COUNT_TOKENS: "count_tokens"}


def api_of(path: bytes) -> str:
    """C{chat}, C{completions}, C{responses}, C{messages}, C{embeddings}, C{count_tokens}, C{models} or C{other}."""
    found = GENERATIONS.get(path) or NOT_GENERATIONS.get(path)
    if found is not None:
        return found
    if path == b"/v1/models" or path.startswith(b"/v1/models/"):
        return "models"
    return "other"


def takes_a_place(method: bytes, path: bytes) -> bool:
    """A generation: a POST (to any path an upstream may generate on) but the ones known to generate nothing."""
    return method == b"POST" and path not in NOT_GENERATIONS


def anthropic_dialect(path: bytes) -> bool:
    """Anthropic's Messages API and its sub-paths (count_tokens): errors in Anthropic's shape."""
    return path == b"/v1/messages" or path.startswith(b"/v1/messages/")
