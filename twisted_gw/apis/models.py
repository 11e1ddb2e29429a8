"""Model lists (C{GET /v1/models}), without I/O."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def union_of_model_lists(documents: Iterable[Any]) -> dict[str, Any]:
    """
    One C{GET /v1/models} answer from several upstreams' answers: every model
    once (the first upstream's entry for it), in the order first seen.
    """
    seen: dict[str, Any] = {}
    for doc in documents:
        for entry in models_in(doc):
            seen.setdefault(entry["id"], entry)
    return {"object": "list", "data": list(seen.values())}


def model_ids(doc: Any) -> frozenset[str]:
    """The ids of the models a C{/v1/models} document lists."""
    return frozenset(e["id"] for e in models_in(doc))


def models_in(doc: Any) -> list[dict[str, Any]]:
    """The model entries (with a string C{id}) of a C{/v1/models} document; [] for anything else."""
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, list):
        return []
    return [e for e in data if isinstance(e, dict) and isinstance(e.get("id"), str)]
