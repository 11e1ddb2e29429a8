"""
Command line, environment and defaults, resolved into one frozen L{Config}.

Every setting has a command-line option and an environment variable: the
option wins over the variable, the variable over the default.  Values are
checked here, so that a bad value stops startup with one clear line.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Optional
from urllib.parse import urlsplit

import attrs
from twisted.python import usage

from twisted_gw.web.access import LOOPBACK, Network, parse_networks

USAGE_DB_DEFAULT = "llmgw-usage.sqlite3"


class ConfigError(usage.UsageError):
    """A setting has a value the gateway cannot run with."""


def _positive_int(name: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ConfigError(f"{name} must be a whole number, not {text!r}") from None
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, not {value}")
        return value

    return parse


def _seconds(name: str, zero_allowed: bool = False) -> Callable[[str], float]:
    """A finite number of seconds: positive, or also 0 where 0 turns the thing off."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"{name} must be a number of seconds, not {text!r}") from None
        if not (0 <= value if zero_allowed else 0 < value) or value == float("inf"):
            what = "0 or a positive" if zero_allowed else "a positive"
            raise ConfigError(f"{name} must be {what} number of seconds, not {text!r}")
        return value

    return parse


def _optional_limit(name: str) -> Callable[[str], Optional[int]]:
    """A whole number where 0 (the default) means no limit."""

    def parse(text: str) -> Optional[int]:
        try:
            value = int(text)
        except ValueError:
            raise ConfigError(f"{name} must be a whole number (0 for no limit), not {text!r}") from None
        if value < 0:
            raise ConfigError(f"{name} must be 0 (no limit) or more, not {value}")
        return value or None

    return parse


def _readable_file_or_empty(name: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text and not os.path.isfile(text):
            raise ConfigError(f"{name}: no such file: {text!r}")
        return text

    return parse


def _networks(text: str) -> tuple[Network, ...]:
    try:
        return parse_networks(text)
    except ValueError as e:
        raise ConfigError(f"metrics-allow: {e}") from None


@attrs.frozen
class UpstreamSpec:
    """One C{--upstream}: its base URL and, when given with C{#slots=N}, its places."""

    url: str
    slots: Optional[int] = None


def upstream_spec(text: str) -> UpstreamSpec:
    """C{http://host:port[/prefix][#slots=N]}, checked."""
    text = text.strip()
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"upstream must be an http:// or https:// URL with a host, not {text!r}")
    try:
        _ = parts.port
    except ValueError:
        raise ConfigError(f"upstream has an invalid port: {text!r}") from None
    if parts.query:
        raise ConfigError(f"upstream must not carry a query: {text!r}")
    slots = None
    if parts.fragment:
        name, _, value = parts.fragment.partition("=")
        if name != "slots":
            raise ConfigError(f"upstream {text!r}: the only option after '#' is slots=N")
        slots = _positive_int("upstream slots")(value)
    return UpstreamSpec(text.partition("#")[0].rstrip("/"), slots)


def _upstream_list(text: str) -> tuple[UpstreamSpec, ...]:
    specs = tuple(upstream_spec(item) for item in text.replace(",", " ").split() if item)
    if not specs:
        raise ConfigError("upstream needs at least one URL")
    urls = [s.url for s in specs]
    if len(set(urls)) != len(urls):
        raise ConfigError(f"upstream given twice: {sorted(u for u in urls if urls.count(u) > 1)[0]}")
    return specs


def _auto_or_positive_int(name: str) -> Callable[[str], Optional[int]]:
    def parse(text: str) -> Optional[int]:
        return None if text.strip().lower() == "auto" else _positive_int(name)(text)

    return parse


def _queue_events(text: str) -> str:
    if text not in ("comment", "data"):
        raise ConfigError(f"queue-events must be 'comment' or 'data', not {text!r}")
    return text


def _assemble_mode(text: str) -> str:
    if text not in ("auto", "always", "never"):
        raise ConfigError(f"assemble-non-stream must be 'auto', 'always' or 'never', not {text!r}")
    return text


def _routing_mode(text: str) -> str:
    if text not in ("cache-aware", "least-busy"):
        raise ConfigError(f"routing must be 'cache-aware' or 'least-busy', not {text!r}")
    return text


def _fraction(name: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"{name} must be a number from 0 to 1, not {text!r}") from None
        if not 0 <= value <= 1:
            raise ConfigError(f"{name} must be from 0 to 1, not {text!r}")
        return value

    return parse


def _state_url(text: str) -> str:
    if not text:
        return ""
    from twisted_gw.admission.store import StoreURL

    try:
        StoreURL.parse(text)
    except ValueError as e:
        raise ConfigError(f"state: {e}") from None
    try:
        import txredisapi  # noqa: F401
    except ImportError:
        raise ConfigError("state: the Redis client is not installed: pip install 'llmgw[cluster]'") from None
    return text


def _cluster_name(text: str) -> str:
    if not text or any(c.isspace() or c in "{}" for c in text):
        raise ConfigError(f"cluster must be a name without spaces or braces, not {text!r}")
    return text


def listen_list(text: str) -> tuple[str, ...]:
    """The endpoint descriptions of C{LISTEN}: space or comma separated."""
    items = tuple(item for item in text.replace(",", " ").split() if item)
    if not items:
        raise ConfigError("listen needs at least one endpoint, e.g. tcp:8000")
    return items


@attrs.frozen
class Setting:
    """One configurable value: its option, environment variable, default and parser."""

    option: str
    env: str
    default: str
    help: str
    parse: Callable[[str], object]
    field: str


SETTINGS: tuple[Setting, ...] = (
    Setting("upstream-api-key", "UPSTREAM_API_KEY", "",
            "Bearer key the upstream itself requires (llama.cpp --api-key); clients' keys are never forwarded.",
            str, "upstream_api_key"),
    Setting("upstream-ca", "UPSTREAM_CA", "",
            "PEM file of the CA(s) that sign an https:// upstream's certificate (a private CA); "
            "empty: the system's trust store. The host name is always verified.",
            _readable_file_or_empty("upstream-ca"), "upstream_ca"),
    Setting("max-concurrent", "MAX_CONCURRENT", "auto",
            "Generation requests (POST) sent to each upstream at once (its places), unless its URL says "
            "#slots=N; the rest queue. 'auto': llama.cpp's total_slots from GET /props, else 1.",
            _auto_or_positive_int("max-concurrent"), "max_concurrent"),
    Setting("users", "USERS_FILE", "users.json",
            "Path of the users file mapping API keys to user names.",
            str, "users_file"),
    Setting("queue-events", "QUEUE_EVENTS", "comment",
            "How a queued stream is told its position: 'comment' (SSE comments only) or "
            "'data' (also the original gateway's queue.update data event).",
            _queue_events, "queue_events"),
    Setting("keepalive-interval", "KEEPALIVE_INTERVAL", "15",
            "Seconds between SSE keepalive comments sent to a stream while it waits in the queue.",
            _seconds("keepalive-interval"), "keepalive_interval"),
    Setting("queue-update-interval", "QUEUE_UPDATE_INTERVAL", "1",
            "Shortest time in seconds between two passes that tell queued streams their new positions: "
            "changes in between are told together (a long queue costs one pass a second, not one per change). "
            "0: every change at once.",
            _seconds("queue-update-interval", zero_allowed=True), "queue_update_interval"),
    Setting("max-queue", "MAX_QUEUE", "100",
            "Requests that may wait in the queue; one more gets 429 with Retry-After.",
            _positive_int("max-queue"), "max_queue"),
    Setting("queue-timeout", "QUEUE_TIMEOUT", "600",
            "Seconds a request may wait in the queue before it gets 503.",
            _seconds("queue-timeout"), "queue_timeout"),
    Setting("upstream-timeout", "UPSTREAM_TIMEOUT", "600",
            "Seconds to wait for the upstream's response headers (504 after).",
            _seconds("upstream-timeout"), "upstream_timeout"),
    Setting("idle-timeout", "IDLE_TIMEOUT", "300",
            "Longest silence, in seconds, between two chunks of an upstream body; a generation "
            "that keeps producing is never cut.",
            _seconds("idle-timeout"), "idle_timeout"),
    Setting("header-timeout", "HEADER_TIMEOUT", "60",
            "Seconds a request's head (its request line and headers) may take to arrive, from its first byte; "
            "a slower one gets 408 and its connection is closed.",
            _seconds("header-timeout"), "header_timeout"),
    Setting("max-body", "MAX_BODY", str(16 * 1024 * 1024),
            "Largest request body in bytes; a larger one gets 413 without being read.",
            _positive_int("max-body"), "max_body"),
    Setting("drain-timeout", "DRAIN_TIMEOUT", "30",
            "On shutdown, seconds running requests may take to finish before they are closed.",
            _seconds("drain-timeout"), "drain_timeout"),
    Setting("assemble-non-stream", "ASSEMBLE_NON_STREAM", "auto",
            "Send non-streaming chat/completions upstream as streams and build the JSON answer here, "
            "so that a client leaving stops the generation at once: 'auto' (when the upstream is "
            "llama.cpp, seen from its /props), 'always' or 'never'.",
            _assemble_mode, "assemble_non_stream"),
    Setting("usage-db", "USAGE_DB", USAGE_DB_DEFAULT,
            "SQLite ledger of finished requests (one row each); per-user totals are restored from it "
            "at startup. 'none' or empty: no ledger.",
            str, "usage_db"),
    Setting("metrics-token", "METRICS_TOKEN", "",
            "When set, /metrics and /metrics/prometheus require 'Authorization: Bearer <token>'. "
            "When unset, they answer loopback clients only, unless --public-metrics.",
            str, "metrics_token"),
    Setting("metrics-allow", "METRICS_ALLOW", "loopback",
            "Without a metrics token, the networks whose clients may read the metrics (and so the dashboard): "
            "comma or space separated, like 'loopback, 192.168.1.0/24'; 'none' for none. A request that came "
            "through a proxy (Forwarded, X-Forwarded-For, CF-Connecting-IP) is never let in by address.",
            _networks, "metrics_allow"),
    Setting("user-max-concurrent", "USER_MAX_CONCURRENT", "0",
            "Default for users without their own max_concurrent: places one user may hold at once (0: no limit).",
            _optional_limit("user-max-concurrent"), "user_max_concurrent"),
    Setting("user-max-queued", "USER_MAX_QUEUED", "0",
            "Default max_queued: requests one user may have waiting (0: no limit beyond --max-queue).",
            _optional_limit("user-max-queued"), "user_max_queued"),
    Setting("user-tokens-per-minute", "USER_TOKENS_PER_MINUTE", "0",
            "Default tokens_per_minute quota per user, prompt + completion (0: none).",
            _optional_limit("user-tokens-per-minute"), "user_tokens_per_minute"),
    Setting("user-tokens-per-day", "USER_TOKENS_PER_DAY", "0",
            "Default tokens_per_day quota per user (UTC day), prompt + completion (0: none).",
            _optional_limit("user-tokens-per-day"), "user_tokens_per_day"),
    Setting("upstream-check-interval", "UPSTREAM_CHECK_INTERVAL", "5",
            "Seconds between checks of each upstream's /health, models and (llama.cpp) slots; an "
            "unhealthy upstream gets no new requests. 0: no checks (every upstream counts as healthy).",
            _seconds("upstream-check-interval", zero_allowed=True), "upstream_check_interval"),
    Setting("upstream-down-grace", "UPSTREAM_DOWN_GRACE", "5",
            "Seconds every upstream may be down (not loading) before generations get 503 no_upstream_available "
            "at once, waiting ones too, instead of waiting for one to come back (a restart passes within it).",
            _seconds("upstream-down-grace"), "upstream_down_grace"),
    Setting("users-poll-interval", "USERS_POLL_INTERVAL", "2",
            "Seconds between checks of the users file for changes.",
            _seconds("users-poll-interval"), "users_poll_interval"),
    Setting("routing", "ROUTING", "cache-aware",
            "With several upstreams: 'cache-aware' sends a generation to the upstream that was sent the longest "
            "prefix of its prompt (its cache holds it), unless that one is out of balance; 'least-busy': the most "
            "free places, ties in turn.",
            _routing_mode, "routing"),
    Setting("routing-cache-mb", "ROUTING_CACHE_MB", "64",
            "Memory for the index of prompts sent to each upstream (cache-aware routing); the least recently "
            "used are forgotten.",
            _positive_int("routing-cache-mb"), "routing_cache_mb"),
    Setting("routing-min-match", "ROUTING_MIN_MATCH", "0.3",
            "The share of a prompt an upstream must hold for the cache to decide (below it: least-busy).",
            _fraction("routing-min-match"), "routing_min_match"),
    Setting("routing-balance-gap", "ROUTING_BALANCE_GAP", "0.5",
            "The best match is out of balance, and least-busy decides, when its share of busy places exceeds the "
            "least busy upstream's by more than this (or it has no free place while another has).",
            _fraction("routing-balance-gap"), "routing_balance_gap"),
    Setting("state", "STATE_URL", "",
            "Share places, the fair queue, per-user limits and quotas with the other replicas started with the "
            "same store and --cluster: redis://[user:password@]host:port/db or rediss://... Empty: all in this "
            "process.",
            _state_url, "state"),
    Setting("state-ca", "STATE_CA", "",
            "PEM file of the CA(s) that sign a rediss:// store's certificate (a private CA); empty: the system's "
            "trust store. The host name is always verified.",
            _readable_file_or_empty("state-ca"), "state_ca"),
    Setting("cluster", "CLUSTER", "llmgw",
            "The name the replicas sharing one store go by (several clusters may share a Redis).",
            _cluster_name, "cluster"),
    Setting("lease-timeout", "LEASE_TIMEOUT", "10",
            "With --state: seconds after which the places and waiters of a replica that stopped renewing its "
            "leases (killed, cut off) go back to the cluster.",
            _seconds("lease-timeout"), "lease_timeout"),
)


UPSTREAM_ENV = "UPSTREAM_URL"
UPSTREAM_DEFAULT = "http://127.0.0.1:8080"


@attrs.frozen
class Config:
    """The gateway's settings, checked and final."""

    listen: tuple[str, ...] = ("tcp:8000",)
    upstreams: tuple[UpstreamSpec, ...] = (UpstreamSpec(UPSTREAM_DEFAULT),)
    upstream_api_key: str = ""
    upstream_ca: str = ""
    max_concurrent: Optional[int] = None  # None: auto
    users_file: str = "users.json"
    queue_events: str = "comment"
    keepalive_interval: float = 15.0
    queue_update_interval: float = 1.0
    users_poll_interval: float = 2.0
    upstream_check_interval: float = 5.0
    upstream_down_grace: float = 5.0
    max_queue: int = 100
    queue_timeout: float = 600.0
    upstream_timeout: float = 600.0
    idle_timeout: float = 300.0
    max_body: int = 16 * 1024 * 1024
    header_timeout: float = 60.0
    drain_timeout: float = 30.0
    assemble_non_stream: str = "auto"
    usage_db: str = USAGE_DB_DEFAULT
    metrics_token: str = ""
    public_metrics: bool = False
    metrics_allow: tuple[Network, ...] = LOOPBACK
    user_max_concurrent: Optional[int] = None
    user_max_queued: Optional[int] = None
    user_tokens_per_minute: Optional[int] = None
    user_tokens_per_day: Optional[int] = None
    routing: str = "cache-aware"
    routing_cache_mb: int = 64
    routing_min_match: float = 0.3
    routing_balance_gap: float = 0.5
    state: str = ""
    state_ca: str = ""
    cluster: str = "llmgw"
    lease_timeout: float = 10.0


LISTEN_ENV = "LISTEN"
LISTEN_DEFAULT = "tcp:8000"


def _help(setting: Setting) -> str:
    return f"{setting.help} [env: {setting.env}] [default: {setting.default}]"


class Options(usage.Options):
    """C{twistd llmgw} options; each has an environment variable."""

    synopsis = "[options]"
    longdesc = (
        "llmgw: a gateway in front of an OpenAI-compatible LLM server, with per-user "
        "bearer keys, a visible queue, unbuffered streaming and usage metrics. "
        "Every option can also be set by its environment variable; the option wins."
    )
    optParameters: list[Sequence[object]] = [
        [s.option, None, None, _help(s)] for s in SETTINGS
    ]
    optFlags: list[Sequence[object]] = [
        ["public-metrics", None,
         "Serve the metrics endpoints to any client when no --metrics-token is set "
         "(they name users). [env: PUBLIC_METRICS=1]"],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["upstream"] = []

    def opt_upstream(self, url: str) -> None:
        """
        Base URL of an OpenAI-compatible upstream (llama.cpp server); '/v1/...' is
        appended. Repeat for several; add '#slots=N' to set its places, e.g.
        http://gpu2:8080#slots=4. [env: UPSTREAM_URL, comma or space
        separated] [default: http://127.0.0.1:8080]
        """
        self["upstream"].append(url)

    def opt_listen(self, description: str) -> None:
        """
        Endpoint to listen on, as a Twisted strports description (e.g. tcp:8000,
        tcp:8000:interface=127.0.0.1, ssl:8443:privateKey=key.pem:certKey=cert.pem).
        Repeat for several. [env: LISTEN, space or comma separated] [default: tcp:8000]
        """
        self["listen"].append(description)

    # twistd wraps option help itself: one line each, without the source's indentation
    opt_listen.__doc__ = " ".join((opt_listen.__doc__ or "").split())
    opt_upstream.__doc__ = " ".join((opt_upstream.__doc__ or "").split())

    def postOptions(self) -> None:
        # usage errors make twistd print the whole help before the message;
        # a bad value deserves just the one line that says what is wrong.
        try:
            self.config = build_config(self, os.environ)
        except ConfigError as e:
            raise SystemExit(f"llmgw: error: {e}") from None


def build_config(options: Mapping[str, object], environ: Mapping[str, str]) -> Config:
    """Resolve CLI values, then environment, then defaults, into a checked L{Config}."""
    values: dict[str, object] = {}
    for s in SETTINGS:
        raw = options.get(s.option)
        if raw is None:
            raw = environ.get(s.env) or s.default
        values[s.field] = s.parse(str(raw))
    listen = options.get("listen") or listen_list(environ.get(LISTEN_ENV) or LISTEN_DEFAULT)
    assert isinstance(listen, (list, tuple))
    values["listen"] = tuple(_check_endpoint(str(d)) for d in listen)
    upstreams = options.get("upstream") or []
    given = " ".join([upstreams] if isinstance(upstreams, str) else map(str, upstreams))  # type: ignore[call-overload]
    values["upstreams"] = _upstream_list(given or environ.get(UPSTREAM_ENV) or UPSTREAM_DEFAULT)
    values["public_metrics"] = bool(options.get("public-metrics")) or _truthy(environ.get("PUBLIC_METRICS", ""))
    return Config(**values)  # type: ignore[arg-type]


def _truthy(text: str) -> bool:
    if text.strip().lower() in ("", "0", "false", "no", "off"):
        return False
    if text.strip().lower() in ("1", "true", "yes", "on"):
        return True
    raise ConfigError(f"PUBLIC_METRICS must be 1/true/yes/on or 0/false/no/off, not {text!r}")


def _check_endpoint(description: str) -> str:
    """Parse a strports description without listening, so a typo fails at startup."""
    from twisted.internet import endpoints, reactor

    try:
        endpoints.serverFromString(reactor, description)
    except Exception as e:  # the parsers raise ValueError, KeyError, TypeError, OSError...
        raise ConfigError(f"cannot use listen endpoint {description!r}: {e}") from None
    return description
