"""
The HTTP surface: Klein routes, bearer authentication, error rendering, and
the site's request class.  Thin: the work is done in L{twisted_gw.proxy}.
"""

from __future__ import annotations

import hmac
import importlib.resources
import ipaddress
import json
import time
from collections.abc import Callable
from io import BytesIO
from typing import Any, Optional

import attrs
from klein import Klein
from prometheus_client import CONTENT_TYPE_LATEST
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, resource, server
from twisted.web.http_headers import _nameEncoder
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException

from twisted_gw.channel import GatewayChannel, put_raw_headers, refusal
from twisted_gw.errors import GatewayError, error_json, unauthorized
from twisted_gw.proxy import Proxy, log_refused

log = Logger(namespace="llmgw.web")

# read once at import, never on a request
DASHBOARD = (importlib.resources.files("twisted_gw") / "static" / "dashboard.html").read_bytes()


def _json(request: IRequest, status: int, doc: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(doc).encode("utf-8")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.removeprefix("::ffff:")).is_loopback
    except ValueError:
        return False


def bearer_key(request: IRequest) -> Optional[str]:
    """The key of an C{Authorization: Bearer <key>} header, or None."""
    header = request.getHeader(b"authorization")
    if header is None:
        return None
    scheme, _, key = header.strip().partition(b" ")
    if scheme.lower() != b"bearer" or not key.strip():
        return None
    try:
        return key.strip().decode("utf-8")
    except UnicodeDecodeError:
        return None


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
        app.handle_errors(GatewayError)(self.gateway_error)
        app.handle_errors(HTTPException)(self.http_error)
        app.handle_errors(Exception)(self.internal_error)

    def resource(self) -> Any:
        return _Front(self, self.app.resource())

    def render_v1(self, request: server.Request) -> Any:
        """
        C{/v1/...} without Klein's routing (werkzeug's URL map costs more than
        the rest of a small request): what Klein does for the C{/v1} branch,
        directly (see L{_V1Call}).
        """
        _V1Call(self, request)
        return server.NOT_DONE_YET

    def dashboard(self, request: IRequest) -> bytes:
        """The live dashboard: one self-contained page; its data comes from /metrics."""
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-cache")
        request.setHeader(b"Content-Security-Policy",
                          b"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                          b"connect-src 'self'; img-src 'self'")
        return DASHBOARD

    def health(self, request: IRequest) -> bytes:
        return _json(request, 200, {"status": "ok"})

    def _check_metrics_access(self, request: IRequest) -> None:
        """User names are private: a token when one is set, else loopback only (unless public)."""
        request.setHeader(b"Cache-Control", b"no-store")
        if self.metrics_token:
            key = bearer_key(request)
            if key is None or not hmac.compare_digest(key.encode(), self.metrics_token.encode()):
                raise unauthorized("The metrics endpoints need 'Authorization: Bearer <metrics token>'.")
            return
        if self.public_metrics:
            return
        host = getattr(request.getClientAddress(), "host", "")
        if not _is_loopback(host):
            raise GatewayError(
                403, "Metrics are served to loopback clients only; set --metrics-token or --public-metrics.",
                "permission_error", "metrics_forbidden",
            )

    def metrics_json(self, request: IRequest) -> bytes:
        self._check_metrics_access(request)
        return _json(request, 200, self.metrics())

    def metrics_prometheus(self, request: IRequest) -> bytes:
        self._check_metrics_access(request)
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode())
        return self.prometheus()

    def v1(self, request: server.Request) -> Deferred[None]:
        """A C{/v1} request: its key checked, then proxied; fires when it is done."""
        user: Optional[str] = None
        try:
            key = bearer_key(request)
            if key is None:
                raise unauthorized("Missing API key: send 'Authorization: Bearer <key>'.")
            user = self.lookup_user(key)
            if user is None:
                raise unauthorized("Incorrect API key provided.")
            if request.path == b"/v1/gateway/me":
                if request.method not in (b"GET", b"HEAD"):
                    raise GatewayError(405, "Use GET.", "invalid_request_error", "method_not_allowed",
                                       {b"Allow": b"GET, HEAD"})
                request.setHeader(b"Cache-Control", b"no-store")
                request.write(_json(request, 200, self.me(user)))
                return succeed(None)
            # (its own refusals are raised here; later errors are in its access line)
            return self.proxy.handle(request, user)
        except Exception:
            self.proxy.keep_books()  # (the access lines of earlier requests first)
            return fail().addErrback(_log_refused, request, user)

    def gateway_error(self, request: IRequest, failure: Failure) -> bytes:
        e = failure.value
        assert isinstance(e, GatewayError)
        request.setResponseCode(e.status)
        request.setHeader(b"Content-Type", b"application/json")
        for name, value in e.headers.items():
            request.setHeader(name, value)
        return e.body()

    def http_error(self, request: IRequest, failure: Failure) -> bytes:
        e = failure.value
        assert isinstance(e, HTTPException)
        code = e.code or 500
        kind = {404: "not_found", 405: "method_not_allowed"}.get(code, "http_error")
        request.setResponseCode(code)
        request.setHeader(b"Content-Type", b"application/json")
        return error_json(e.description or e.name, "invalid_request_error", kind)

    def internal_error(self, request: IRequest, failure: Failure) -> Optional[bytes]:
        log.failure("unhandled error on {path}", failure, path=request.uri)
        if request.startedWriting:  # type: ignore[attr-defined]
            request.channel.transport.loseConnection()  # type: ignore[attr-defined]
            return None
        request.setResponseCode(500)
        request.setHeader(b"Content-Type", b"application/json")
        return error_json("Internal gateway error", "server_error", "internal_error")


class _Front(resource.Resource):
    """
    The site's root: plain C{/v1} requests go to L{GatewayApp.render_v1},
    C{GET /health} straight to its handler,
    everything else (and any C{/v1} path with percent-escapes, which Klein
    decodes and judges) to Klein's resource, unchanged.
    """

    isLeaf = True

    def __init__(self, app: GatewayApp, klein: Any) -> None:
        super().__init__()
        self._app = app
        self._klein = klein

    def render(self, request: server.Request) -> Any:
        path = request.path
        if (path == b"/v1" or path.startswith(b"/v1/")) and b"%" not in path:
            return self._app.render_v1(request)
        if path == b"/health" and request.method in (b"GET", b"HEAD"):
            return self._app.health(request)  # probed often; the cheapest answer
        return self._klein.render(request)


class _V1Call:
    """
    One C{/v1} request's handler: cancelled when the client leaves, its
    errors rendered by the app's handlers, the request finished unless the
    client has gone.  A small object with bound methods rather than closures:
    thousands of them may wait in the queue at once.
    """

    __slots__ = ("app", "finished", "handler", "request")

    def __init__(self, app: GatewayApp, request: server.Request) -> None:
        self.app = app
        self.request = request
        self.finished = False
        self.handler = app.v1(request)
        request.notifyFinish().addCallbacks(self._done, self._gone)
        self.handler.addBoth(self._end)

    def _gone(self, failure: Failure) -> None:
        self.finished = True
        self.handler.cancel()

    def _done(self, result: object) -> None:
        self.finished = True

    def _failed(self, failure: Failure) -> Optional[bytes]:
        if self.finished:
            if not failure.check(CancelledError):
                log.failure("Unhandled Error Processing Request.", failure)
            return None
        if failure.check(GatewayError):
            return self.app.gateway_error(self.request, failure)
        return self.app.internal_error(self.request, failure)

    def _end(self, result: object) -> None:
        """The handler is done: its error rendered, the request finished (unless the client left)."""
        try:
            body = self._failed(result) if isinstance(result, Failure) else None
            if body is not None:
                self.request.write(body)
            if not self.finished:
                self.request.finish()
        except Exception:
            log.failure("Unhandled Error writing response")


def _log_refused(failure: Failure, request: server.Request, user: Optional[str]) -> Failure:
    """A request refused before it was proxied (bad key, bad input) still gets its access line."""
    e = failure.value
    if isinstance(e, GatewayError) and not e.accounted:
        log_refused(request, user, e)
    return failure


class GatewayRequest(server.Request):
    """
    Keeps request bodies in memory (never a temporary file on the reactor
    thread), and refuses one larger than the site's C{max_body} with 413 as soon
    as that is known: from C{Content-Length} before any of the body is read, or
    when a chunked body grows past it.
    """

    _refused = False
    _received = 0

    def _max_body(self) -> int:
        return int(getattr(getattr(self.channel, "site", None), "max_body", DEFAULT_MAX_BODY))

    def gotLength(self, length: Optional[int]) -> None:
        self.content = BytesIO()
        if length is not None and length > self._max_body():
            self._refuse()

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self._max_body():
            self.content = BytesIO()
            self._refuse()
            return
        assert self.content is not None
        self.content.write(data)  # (Twisted's handleContentChunk)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if not self._refused:
            self.received_whole(command, path, version)

    def getHeader(self, key: Any) -> Any:
        """
        L{http.Request.getHeader}; a bytes name seen before is looked up by the
        canonical name Twisted's cache has for it, without C{getRawHeaders}'
        two calls.
        """
        if type(key) is bytes:
            name = _CANONICAL_NAMES.get(key)
            if name is not None:
                values = self.requestHeaders._rawHeaders.get(name)
                return None if values is None else values[-1]
        return super().getHeader(key)

    def received_whole(self, command: bytes, path: bytes, version: bytes) -> None:
        """
        L{http.Request.requestReceived} for a site that parses no forms (the
        gateway's): the body rewound, the method, URI, version, path and query
        arguments set, then processed.
        """
        if self._parsePOSTFormSubmission:  # (another site's request: Twisted's own)
            super().requestReceived(command, path, version)
            return
        assert self.content is not None
        self.content.seek(0, 0)
        self.method, self.uri, self.clientproto = command, path, version
        self.path, query, argstring = path.partition(b"?")
        self.args = http.parse_qs(argstring, 1) if query else {}
        self.process()

    def process(self) -> None:
        """
        L{server.Request.process}, without what it costs on every request
        for nothing: a path without percent-escapes is its own unquoted
        form, and the C{Date} header changes once a second.
        """
        path = self.path
        if b"%" in path or path == b"*":
            super().process()
            return
        self.site = self.channel.site  # type: ignore[attr-defined]
        put_raw_headers(self.responseHeaders, ((b"Server", (_SERVER,)), (b"Date", (_http_date(),))))
        self.prepath = []
        self.postpath = path[1:].split(b"/")
        try:
            site = self.site
            if type(site).getResourceFor is server.Site.getResourceFor:
                # (what it does, for a request just made: its site path is empty)
                self.sitepath: list[bytes] = []
                found = resource.getChildForRequest(site.resource, self)
            else:
                found = site.getResourceFor(self)
            if resource._IEncodingResource.providedBy(found):  # (as Twisted does; the gateway has none)
                encoder = found.getEncoder(self)
                if encoder is not None:
                    self._encoder = encoder
            self.render(found)
        except BaseException:
            self.processingFailed(Failure())

    def write(self, data: bytes) -> None:
        super().write(data)
        if not data and isinstance(self.channel, GatewayChannel):
            self.channel.flush_headers()  # headers written without a body: they go out now

    def _refuse(self) -> None:
        self._refused = True
        assert self.channel is not None and self.channel.transport is not None
        self.channel.transport.write(refusal(
            413, f"The request body is larger than the gateway's limit of {self._max_body()} bytes.",
            "request_too_large",
        ))
        self.channel.transport.loseConnection()


DEFAULT_MAX_BODY = 16 * 1024 * 1024
_CANONICAL_NAMES = _nameEncoder._canonicalHeaderCache

_SERVER: bytes = server.version
_date: tuple[int, bytes] = (0, b"")


def _http_date() -> bytes:
    """The C{Date} header's value now, made once a second."""
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, http.datetimeToString(now))
    return _date[1]

# The attributes a request has while it waits in the queue (and once it is done).  CPython keeps the attribute
# names of a class's instances in one table shared by them all, up to 30 names, and an instance that needs a name
# the table has no room for gets a dict of its own: about 1.5 KB more for every waiting client.  The table fills
# in the order names are first set, by whichever requests come first (a /health probe sets names a waiting
# stream never does), so these are set first, once, on a throwaway instance.
REQUEST_ATTRIBUTES = (
    "notifications", "channel", "requestHeaders", "received_cookies", "responseHeaders", "cookies", "transport",
    "queued", "_parsePOSTFormSubmission", "_adapterCache", "content", "_received", "args", "method", "uri",
    "clientproto", "path", "client", "host", "site", "sitepath", "prepath", "postpath", "code", "code_message",
    "startedWriting", "chunked", "sentLength", "finished", "_disconnected",
)


def _share_attribute_names(cls: type, names: tuple[str, ...]) -> None:
    primer: object = object.__new__(cls)
    for name in names:
        object.__setattr__(primer, name, None)


_share_attribute_names(GatewayRequest, REQUEST_ATTRIBUTES)


class GatewaySite(server.Site):
    """A site without Twisted's combined access log: the proxy logs each request itself."""

    noisy = False
    protocol = GatewayChannel  # type: ignore[assignment]  # HTTP/1.1 only, no HTTP/2 wrapper

    def __init__(self, resource: Any, max_body: int = DEFAULT_MAX_BODY) -> None:
        # A proxy forwards bodies as they are: never parse a form upload into
        # request.args (that also cost ~100 us of email.message work per POST).
        super().__init__(resource, requestFactory=GatewayRequest, parsePOSTFormSubmission=False)
        self.max_body = max_body

    def log(self, request: http.Request) -> None:
        pass
