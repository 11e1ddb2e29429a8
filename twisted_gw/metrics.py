"""The JSON document served at C{/metrics}."""

from __future__ import annotations

from typing import Any

from twisted_gw.accounting import WINDOW_1M, WINDOW_5M, Accounting
from twisted_gw.admission import Admission


def snapshot(admission: Admission, accounting: Accounting) -> dict[str, Any]:
    """
    The original gateway's keys (C{tokens} and C{per_user_tokens} count
    completion tokens, as they did there) plus prompt/completion splits.
    """
    totals = accounting.totals
    return {
        "queue": {
            "waiting": admission.waiting,
            "active": admission.active,
            "depth": admission.waiting + admission.active,
            "max_concurrent": admission.limit,
        },
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
    }
