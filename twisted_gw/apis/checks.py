"""
Pure checks of what a client sent, before anything is forwarded: the path,
the headers to pass on, and the JSON body's C{stream} flag.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from twisted_gw.apis.errors import GatewayError, bad_request

# RFC 9110 7.6.1 and the older proxy ones still seen in the wild.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
    b"proxy-connection", b"te", b"trailer", b"trailers", b"transfer-encoding", b"upgrade",
})

# Also dropped from requests: the gateway sets its own Host and length, the
# client's key (either header) is not the upstream's and must never reach its
# logs, X-Gateway-User is the gateway's to say, and the gateway must read usage
# from the response, so no compression.
REQUEST_DROP = HOP_BY_HOP | {
    b"host", b"authorization", b"x-api-key", b"content-length", b"x-gateway-user", b"accept-encoding",
}

# Never copied from an upstream's response: its framing (Twisted frames what the gateway writes) and
# the hop-by-hop headers, whatever the client library already took out.
RESPONSE_DROP = HOP_BY_HOP | {b"content-length"}

GATEWAY_USER_HEADER = b"X-Gateway-User"

# Header lines as name and values pairs.
HeaderPairs = Sequence[tuple[bytes, Sequence[bytes]]]

_ENCODED_SEPARATOR = re.compile(rb"%(2f|5c|2e)", re.IGNORECASE)


_PRINTABLE = bytes(range(0x21, 0x7F))

METHODS = frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS"})


def check_method(method: bytes) -> None:
    if method not in METHODS:
        raise GatewayError(
            405, f"Method {method.decode('ascii', 'replace')!r} is not allowed", "invalid_request_error",
            "method_not_allowed", {b"Allow": b", ".join(sorted(METHODS))},
        )


def check_uri(uri: bytes) -> bytes:
    """
    Accept a C{/v1/...} request URI to be forwarded as it is; refuse anything
    that could reach another path upstream than the one it names.
    """
    path, _, _ = uri.partition(b"?")
    if not path.startswith(b"/v1/") and path != b"/v1":
        raise GatewayError(404, "Unknown path; the API is under /v1/", "invalid_request_error", "not_found")
    if b"\\" in path or _ENCODED_SEPARATOR.search(path) or b"#" in path:
        raise bad_request("Encoded separators and dots are not allowed in the path", "invalid_path")
    if b"/." in path and any(segment in (b".", b"..") for segment in path.split(b"/")):
        raise bad_request("Dot segments are not allowed in the path", "invalid_path")
    if uri.translate(None, _PRINTABLE):  # (what is left once the printable bytes are taken out)
        raise bad_request("The request URI must be printable ASCII", "invalid_path")
    return uri


def connection_tokens(values: Iterable[bytes]) -> set[bytes]:
    """Header names listed in C{Connection}, which are hop-by-hop too."""
    return {t.strip().lower() for v in values for t in v.split(b",") if t.strip()}


def forward_headers(
    raw: Iterable[tuple[bytes, Sequence[bytes]]], connection: Iterable[bytes], drop: frozenset[bytes]
) -> list[tuple[bytes, Sequence[bytes]]]:
    """The headers to pass on: all but C{drop} and those named by C{Connection}."""
    skip = drop | connection_tokens(connection) if connection else drop
    return [(name, values) for name, values in raw if name.lower() not in skip]


@dataclass(frozen=True, slots=True)
class BodyInfo:
    """What the gateway needs to know of a request body (the body itself is kept as it came)."""

    stream: bool = False
    model: Optional[str] = None
    is_object: bool = False  # a JSON object (one the gateway may rewrite: see parse_object)


def _is_json_type(content_type: Optional[bytes]) -> bool:
    if content_type is None:
        return True
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or media.endswith(b"+json")


def _refuse_constant(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def parse_json(body: bytes) -> Any:
    """
    C{body} as JSON, or the 400 that says why not: not UTF-8, not JSON
    (NaN and Infinity included: JSON has neither).
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(f"The request body is not valid UTF-8: {e}", "invalid_encoding") from None
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as e:
        raise bad_request(f"The request body is not valid JSON: {e}", "invalid_json") from None


def parse_object(body: bytes) -> dict[str, Any]:
    """The JSON object of a body that L{inspect_body} found to be one."""
    doc = parse_json(body)
    assert isinstance(doc, dict)
    return doc


def inspect_body(body: bytes, content_type: Optional[bytes]) -> BodyInfo:
    """
    Read the C{stream} flag and model from a JSON body.  Malformed JSON, a
    non-UTF-8 body or a C{stream} that is not a boolean is a 400; a body
    that is not JSON (multipart, say) passes untouched.  The parsed document
    is not kept: a request may wait long in the queue, and a document takes
    several times its text's memory.
    """
    if not body or not _is_json_type(content_type):
        return BodyInfo()
    doc = parse_json(body)
    if not isinstance(doc, dict):
        return BodyInfo()
    stream = doc.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean", "invalid_type")
    model = doc.get("model")
    return BodyInfo(stream=stream, model=model if isinstance(model, str) else None, is_object=True)
