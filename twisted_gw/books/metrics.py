"""The JSON document served at C{/metrics}."""

from __future__ import annotations

from typing import Any, Optional

from twisted_gw.admission import OK, UNKNOWN, Admission, Router, UserSettings
from twisted_gw.admission.quota import Quotas
from twisted_gw.books.accounting import BUCKET, WINDOW_1M, WINDOW_5M, Accounting, UserTotals


def snapshot(
    admission: Admission, accounting: Accounting, live: Optional[list[dict[str, Any]]] = None,
    router: Optional[Router] = None,
) -> dict[str, Any]:
    """
    The original gateway's keys (C{tokens} and C{per_user_tokens} count
    completion tokens, as they did there) plus prompt/completion splits;
    C{live}: the requests in flight, for the dashboard.
    """
    totals = accounting.totals
    doc = _snapshot(admission, accounting, totals)
    if live is not None:
        doc["streams"] = live
    if router is not None:
        states = {r.state for r in router.routes}
        # the whole: reachable when any upstream is (None before any check)
        reachable = True if OK in states else None if states == {UNKNOWN} else False
        doc["upstream"] = {"reachable": reachable, "slots": router.places}
        doc["upstreams"] = [r.describe() for r in router.routes]
        doc["routing"] = router.routing_document()
    return doc


def _snapshot(admission: Admission, accounting: Accounting, totals: UserTotals) -> dict[str, Any]:
    return {
        "queue": {  # (the cluster's, with a shared store)
            "waiting": admission.cluster_waiting,
            "active": admission.cluster_active,
            "depth": admission.cluster_waiting + admission.cluster_active,
            "max_concurrent": admission.limit,
        },
        "replica": {"waiting": admission.waiting, "active": admission.active},
        "cluster": admission.cluster_document(),
        "waiting_users": admission.waiting_users(),
        "throughput": {
            "tokens_per_second_1m": round(accounting.tokens_per_second(WINDOW_1M), 3),
            "tokens_per_second_5m": round(accounting.tokens_per_second(WINDOW_5M), 3),
        },
        "latency": {
            "avg_response_time_s": round(accounting.average_response_time(), 4),
            **accounting.percentiles(),
        },
        "totals": {
            "requests": totals.requests,
            "tokens": totals.completion_tokens,
            "prompt_tokens": totals.prompt_tokens,
            "completion_tokens": totals.completion_tokens,
            "cancelled": totals.cancelled,
        },
        "per_user_tokens": {
            name: user.completion_tokens for name, user in sorted(accounting.users.items())
        },
        "users": {
            name: {
                "requests": user.requests,
                "prompt_tokens": user.prompt_tokens,
                "completion_tokens": user.completion_tokens,
                "cancelled": user.cancelled,
            }
            for name, user in sorted(accounting.users.items())
        },
        "users_today": {name: _today(totals) for name, totals in sorted(accounting.today.items())},
        "history": {"step_s": BUCKET, "tokens_per_second": [[t, round(r, 3)] for t, r in accounting.history()]},
        "recent_problems": list(accounting.problems),
    }


def _today(totals: UserTotals) -> dict[str, int]:
    return {"requests": totals.requests, "prompt_tokens": totals.prompt_tokens,
            "completion_tokens": totals.completion_tokens}


def me_document(
    user: str, settings: UserSettings, accounting: Accounting, admission: Admission, quotas: Quotas
) -> dict[str, Any]:
    """C{GET /v1/gateway/me}: the caller's own usage, quotas, limits and queue places."""
    totals = accounting.users.get(user, UserTotals())
    return {
        "user": user,
        "usage": {
            "requests": totals.requests,
            "prompt_tokens": totals.prompt_tokens,
            "completion_tokens": totals.completion_tokens,
            "cancelled": totals.cancelled,
        },
        "quota": {
            w.name: {"limit": w.limit, "used": w.used, "remaining": w.remaining, "reset_s": round(w.reset, 3)}
            for w in quotas.windows(user, settings)
        },
        "limits": {
            "weight": settings.weight,
            "max_concurrent": settings.max_concurrent,
            "max_queued": settings.max_queued,
        },
        "queue": {
            "running": admission.running_of(user),
            "positions": admission.positions_of(user),
        },
    }
