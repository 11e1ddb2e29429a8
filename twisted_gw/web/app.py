"""
The HTTP surface: Klein routes, bearer authentication and error rendering.
Thin: the work is done in L{twisted_gw.proxy}.
"""

from __future__ import annotations

import hmac
import importlib.resources
import json
from collections.abc import Callable
from typing import Any, Optional

import attrs
from klein import Klein
from prometheus_client import CONTENT_TYPE_LATEST
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException

from twisted_gw.apis.errors import GatewayError, bad_request, dialect_json, unauthorized
from twisted_gw.apis.kinds import anthropic_dialect
from twisted_gw.proxy import Proxy
from twisted_gw.web.access import LOOPBACK, PROXY_HEADERS, Network, address_allowed, describe
from twisted_gw.web.response import WebResponse, client_request

log = Logger(namespace="llmgw.web")

# read once at import, never on a request
DASHBOARD = (importlib.resources.files("twisted_gw.web") / "static" / "dashboard.html").read_bytes()


def _json(request: IRequest, status: int, doc: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(doc).encode("utf-8")


def _key_text(raw: bytes) -> Optional[str]:
    """A key as sent in a header, or None when empty or not UTF-8."""
    try:
        return raw.strip().decode("utf-8") or None
    except UnicodeDecodeError:
        return None


def bearer_key(request: IRequest) -> Optional[str]:
    """The key of an C{Authorization: Bearer <key>} header, or None."""
    header = request.getHeader(b"authorization")
    if header is None:
        return None
    scheme, _, key = header.strip().partition(b" ")
    return _key_text(key) if scheme.lower() == b"bearer" else None


def api_key_header(request: IRequest) -> Optional[str]:
    """The key of an C{x-api-key: <key>} header (Anthropic's), or None."""
    header = request.getHeader(b"x-api-key")
    return None if header is None else _key_text(header)


@attrs.define
class GatewayApp:
    """Routes of the gateway; C{lookup_user} maps a key to a user name."""

    proxy: Proxy
    lookup_user: Callable[[str], Optional[str]]
    metrics: Callable[[], dict[str, Any]]
    prometheus: Callable[[], bytes] = lambda: b""
    me: Callable[[str], dict[str, Any]] = lambda user: {"user": user}
    metrics_token: str = ""
    public_metrics: bool = False
    metrics_allow: tuple[Network, ...] = LOOPBACK
    upstreams_up: Callable[[], bool] = lambda: True
    app: Klein = attrs.field(init=False, factory=Klein)

    def __attrs_post_init__(self) -> None:
        app = self.app
        # Paths are forwarded as sent; werkzeug must not redirect '//' to '/'.
        app.url_map.merge_slashes = False
        app.route("/", methods=["GET", "HEAD"])(self.dashboard)
        app.route("/dashboard", methods=["GET", "HEAD"])(self.dashboard)
        app.route("/health", methods=["GET", "HEAD"])(self.health)
        app.route("/metrics", methods=["GET"])(self.metrics_json)
        app.route("/metrics/prometheus", methods=["GET"])(self.metrics_prometheus)
        app.route("/v1", branch=True)(self.v1)
        app.route("/v1/")(self.v1)  # (the branch's rule takes /v1/ with something after it)
        app.handle_errors(GatewayError)(self.gateway_error)
        app.handle_errors(HTTPException)(self.http_error)
        app.handle_errors(Exception)(self.internal_error)

    def resource(self) -> Any:
        return self.app.resource()

    def dashboard(self, request: IRequest) -> bytes:
        """The live dashboard: one self-contained page; its data comes from /metrics."""
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-cache")
        request.setHeader(b"Content-Security-Policy",
                          b"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                          b"connect-src 'self'; img-src 'self'")
        return DASHBOARD

    def health(self, request: Any) -> bytes:
        """
        The process is alive; with C{?upstreams=1}, also that an upstream is
        up (503 when none is), for load balancers and Docker's HEALTHCHECK.
        """
        if b"upstreams" in request.args and not self.upstreams_up():
            return _json(request, 503, {"status": "no upstream is up"})
        return _json(request, 200, {"status": "ok"})

    def _check_metrics_access(self, request: IRequest) -> None:
        """User names are private: a token when one is set, else clients of --metrics-allow (unless public)."""
        request.setHeader(b"Cache-Control", b"no-store")
        if self.metrics_token:
            key = bearer_key(request)
            if key is None or not hmac.compare_digest(key.encode(), self.metrics_token.encode()):
                raise unauthorized("The metrics endpoints need 'Authorization: Bearer <metrics token>'.")
            return
        if self.public_metrics:
            return
        host = getattr(request.getClientAddress(), "host", "")
        proxied = any(request.requestHeaders.hasHeader(name) for name in PROXY_HEADERS)
        if proxied or not address_allowed(host, self.metrics_allow):
            why = "through a proxy" if proxied else f"from {host or 'an unknown address'}"
            raise GatewayError(
                403, f"Metrics are served without a token only to clients of {describe(self.metrics_allow)} that "
                f"reach the gateway directly, not {why}; its admin can set --metrics-token (METRICS_TOKEN), "
                "--metrics-allow (METRICS_ALLOW) or --public-metrics.",
                "permission_error", "metrics_forbidden",
            )

    def metrics_json(self, request: IRequest) -> bytes:
        self._check_metrics_access(request)
        return _json(request, 200, self.metrics())

    def metrics_prometheus(self, request: IRequest) -> bytes:
        self._check_metrics_access(request)
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode())
        return self.prometheus()

    def early_refusal(self, target: bytes, request: IRequest) -> Optional[tuple[int, str, str, dict[bytes, bytes]]]:
        """
        The refusal a C{/v1} request (to C{target}, as its request line
        says) gets from its headers alone (a missing or unknown key), for a
        client that waits for C{100 Continue} before it sends its body; None
        for anything else.
        """
        path = target.partition(b"?")[0]
        if path != b"/v1" and not path.startswith(b"/v1/"):
            return None
        try:
            self._user_of(request)
        except GatewayError as e:
            return (e.status, e.message, e.code or "error", e.headers)
        return None

    def _user_of(self, request: IRequest) -> str:
        """
        The user whose key the request carries, as C{Authorization: Bearer}
        or Anthropic's C{x-api-key}; raises the 401 (or 400, for two different
        keys) to answer.
        """
        key = bearer_key(request)
        other = api_key_header(request)
        if key is not None and other is not None and other != key:
            raise bad_request("The request carries two different keys (Authorization and x-api-key).",
                              "ambiguous_credentials")
        key = key if key is not None else other
        if key is None:
            raise unauthorized("Missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'.")
        user = self.lookup_user(key)
        if user is None:
            raise unauthorized("Incorrect API key provided.")
        return user

    def v1(self, request: Any) -> Deferred[None] | bytes:
        """
        A C{/v1} request: its key checked, then proxied; the Deferred fires
        when it is done, and Klein cancels it when the client leaves.
        """
        user: Optional[str] = None
        proxied = client_request(request)
        try:
            user = self._user_of(request)
            if request.path == b"/v1/gateway/me":
                if request.method not in (b"GET", b"HEAD"):
                    raise GatewayError(405, "Use GET.", "invalid_request_error", "method_not_allowed",
                                       {b"Allow": b"GET, HEAD"})
                request.setHeader(b"Cache-Control", b"no-store")
                return _json(request, 200, self.me(user))
            # (its own refusals are raised here; later errors are in its access line)
            return self.proxy.handle(proxied, WebResponse(request), user)
        except GatewayError as e:
            if not e.accounted:
                self.proxy.refused(proxied, user, e)
            raise

    def gateway_error(self, request: IRequest, failure: Failure) -> bytes:
        e = failure.value
        assert isinstance(e, GatewayError)
        request.setResponseCode(e.status)
        request.setHeader(b"Content-Type", b"application/json")
        for name, value in e.headers.items():
            request.setHeader(name, value)
        return e.body(anthropic_dialect(request.path))

    def http_error(self, request: IRequest, failure: Failure) -> bytes:
        e = failure.value
        assert isinstance(e, HTTPException)
        code = e.code or 500
        kind = {404: "not_found", 405: "method_not_allowed"}.get(code, "http_error")
        request.setResponseCode(code)
        request.setHeader(b"Content-Type", b"application/json")
        return dialect_json(code, e.description or e.name, "invalid_request_error", kind,
                            anthropic_dialect(request.path))

    def internal_error(self, request: Any, failure: Failure) -> Deferred[None] | bytes:
        log.failure("unhandled error on {path}", failure, path=request.uri)
        if request.startedWriting:
            # Too late for an error answer: the response is cut off, never finished (it would look whole).
            closed: Deferred[None] = request.notifyFinish()
            request.loseConnection()
            return closed.addErrback(lambda _: None)
        request.setResponseCode(500)
        request.setHeader(b"Content-Type", b"application/json")
        return dialect_json(500, "Internal gateway error", "server_error", "internal_error",
                            anthropic_dialect(request.path))
