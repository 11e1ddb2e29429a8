"""
Errors in the client's dialect: OpenAI's C{{"error": {"message", "type", "code"}}},
or on Anthropic's Messages API C{{"type": "error", "error": {"type", "message"}}}
with Anthropic's error type for the status.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Optional


def error_document(message: str, type: str, code: Optional[str]) -> dict[str, object]:
    return {"error": {"message": message, "type": type, "code": code}}


def error_json(message: str, type: str, code: Optional[str]) -> bytes:
    return json.dumps(error_document(message, type, code)).encode("utf-8")


# Anthropic's error types by status (docs.anthropic.com, "Errors").
ANTHROPIC_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    408: "timeout_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error", 502: "api_error",
    503: "overloaded_error", 504: "timeout_error", 529: "overloaded_error",
}


def anthropic_type(status: int) -> str:
    return ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def anthropic_document(status: int, message: str) -> dict[str, object]:
    return {"type": "error", "error": {"type": anthropic_type(status), "message": message}}


def dialect_json(status: int, message: str, type: str, code: Optional[str], anthropic: bool) -> bytes:
    """An error body in OpenAI's shape, or in Anthropic's when C{anthropic}."""
    doc = anthropic_document(status, message) if anthropic else error_document(message, type, code)
    return json.dumps(doc).encode("utf-8")


class GatewayError(Exception):
    """An error the gateway answers with: its status, message, type, code and extra headers."""

    def __init__(
        self, status: int, message: str, type: str = "invalid_request_error", code: Optional[str] = None,
        headers: Optional[Mapping[bytes, bytes]] = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.headers = dict(headers or {})
        self.accounted = False  # already in the access log and the books

    def __str__(self) -> str:
        return f"{self.status} {self.message}"

    def body(self, anthropic: bool = False) -> bytes:
        return dialect_json(self.status, self.message, self.type, self.code, anthropic)


def unauthorized(message: str) -> GatewayError:
    return GatewayError(
        401, message, "invalid_request_error", "invalid_api_key",
        {b"WWW-Authenticate": b'Bearer realm="llmgw"'},
    )


def bad_request(message: str, code: str = "invalid_request") -> GatewayError:
    return GatewayError(400, message, "invalid_request_error", code)


def bad_gateway(message: str, code: str = "upstream_unreachable") -> GatewayError:
    return GatewayError(502, message, "upstream_error", code)


def gateway_timeout(message: str, code: str) -> GatewayError:
    return GatewayError(504, message, "upstream_error", code)


def unavailable(message: str, code: str, retry_after: int | None = None) -> GatewayError:
    headers = {b"Retry-After": str(retry_after).encode()} if retry_after else {}
    return GatewayError(503, message, "server_error", code, headers)
