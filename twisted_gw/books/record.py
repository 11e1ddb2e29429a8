"""What one finished request cost: the value every book keeps."""

from __future__ import annotations

from typing import Optional

import attrs


@attrs.frozen
class RequestRecord:
    """What one finished request cost."""

    user: str
    method: str
    path: str
    status: int
    prompt_tokens: int
    completion_tokens: int
    duration: float
    queue_wait: float = 0.0
    cancelled: bool = False
    usage_source: str = "none"
    model: Optional[str] = None
    ttft: Optional[float] = None
    tokens_per_second: Optional[float] = None
    error: Optional[str] = None
    api: str = "other"  # chat, completions, responses, messages, embeddings, count_tokens, models or other

    @property
    def generation(self) -> bool:
        """Whether it asked an upstream to generate (or embed): what latency windows and queue times are about."""
        return self.method == "POST" and self.api != "count_tokens"
