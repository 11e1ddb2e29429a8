"""A user's share of the upstreams and limits, as the users file and the defaults set them."""

from __future__ import annotations

from typing import Optional

import attrs


@attrs.frozen
class UserSettings:
    """A user's share and limits; L{None} means the gateway-wide default."""

    weight: float = 1.0
    max_concurrent: Optional[int] = None
    max_queued: Optional[int] = None
    tokens_per_minute: Optional[int] = None
    tokens_per_day: Optional[int] = None

    def with_defaults(self, defaults: UserSettings) -> UserSettings:
        """These settings, with C{defaults}' limits where these have none (the weight is always one's own)."""
        return UserSettings(
            weight=self.weight,
            max_concurrent=_pick(self.max_concurrent, defaults.max_concurrent),
            max_queued=_pick(self.max_queued, defaults.max_queued),
            tokens_per_minute=_pick(self.tokens_per_minute, defaults.tokens_per_minute),
            tokens_per_day=_pick(self.tokens_per_day, defaults.tokens_per_day),
        )


def _pick(mine: Optional[int], default: Optional[int]) -> Optional[int]:
    return mine if mine is not None else default
