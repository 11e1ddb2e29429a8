"""Errors in the client's dialect: OpenAI's C{{"error": {"message", "type", "code"}}}."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Optional


def error_document(message: str, type: str, code: Optional[str]) -> dict[str, object]:
    return {"error": {"message": message, "type": type, "code": code}}


def error_json(message: str, type: str, code: Optional[str]) -> bytes:
    return json.dumps(error_document(message, type, code)).encode("utf-8")


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

    def body(self) -> bytes:
        return error_json(self.message, self.type, self.code)


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
