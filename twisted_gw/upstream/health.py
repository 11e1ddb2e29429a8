"""
What a check finds an upstream to be: up (with its slots and models), loading
a model, or down.  The service writes it into the upstream's route.
"""

from __future__ import annotations

from typing import Literal, Optional

import attrs

from twisted_gw.apis.models import model_ids
from twisted_gw.upstream.client import Upstream

State = Literal["ok", "loading", "down"]


@attrs.frozen
class Health:
    """One check's findings; C{slots} and C{models} are None where they were not read."""

    state: State
    slots: Optional[int] = None
    models: Optional[frozenset[str]] = None
    read_props: bool = False  # whether /props was read (slots is then what it said, None for none)
    reason: str = ""  # why it is down


def _reason(e: BaseException) -> str:
    """A short reason for a failed check, unwrapping Twisted's wrapper exceptions."""
    inner = getattr(e, "reasons", None)
    if inner:
        return _reason(getattr(inner[0], "value", inner[0]))
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:200]


async def probe(upstream: Upstream, read_props: bool) -> Health:
    """
    Healthy when C{GET /health} answers 200 (or, for a server without
    C{/health}, C{GET /v1/models} does), loading on 503, down on anything
    else, an error included; when healthy, its models and, when
    C{read_props} (it has just come up: it may be another build, with other
    slots), llama.cpp's slot count from C{/props}.  Never fails.
    """
    try:
        code, _ = await upstream.get_json(b"/health")
        if code in (404, 405):  # no /health here (an OpenAI-style server): the model list will do
            code, _ = await upstream.get_json(b"/v1/models")
        if code != 200:
            return Health("loading") if code == 503 else Health("down", reason=f"it answered {code}")
        slots = upstream.learn_props(*await upstream.get_json(b"/props")) if read_props else None
        code, doc = await upstream.get_json(b"/v1/models")
        return Health("ok", slots, model_ids(doc) if code == 200 else None, read_props)
    except Exception as e:
        return Health("down", reason=_reason(e))
