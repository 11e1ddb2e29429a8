"""llmgw: a Twisted gateway in front of self-hosted OpenAI-compatible LLM servers."""

__version__ = "0.1.0"
