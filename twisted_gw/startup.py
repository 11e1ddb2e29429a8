"""What the gateway says when it starts: one line for each part that a misconfiguration would leave useless."""

from __future__ import annotations

import os
from urllib.parse import urlsplit, urlunsplit

from twisted.internet.interfaces import IListeningPort

from twisted_gw.config import Config
from twisted_gw.web.access import describe


def redacted(url: str) -> str:
    """C{url} with the password of its user part, if any, replaced by C{***}."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.netloc.rpartition('@')[2]}"
    return urlunsplit(parts._replace(netloc=netloc))


def listening(description: str, port: IListeningPort) -> str:
    host = port.getHost()
    address, number = getattr(host, "host", ""), getattr(host, "port", "")
    where = f"[{address}]:{number}" if ":" in address else f"{address}:{number}"
    return f"listening on {description} ({where})"


def dashboard(config: Config, description: str, port: IListeningPort) -> str:
    """Where the dashboard is, on the first listener, and what access its data needs."""
    host = port.getHost()
    address = getattr(host, "host", "127.0.0.1")
    if address in ("0.0.0.0", "::", ""):
        address = "127.0.0.1"
    scheme = "https" if description.startswith("ssl:") else "http"
    if ":" in address:
        address = f"[{address}]"
    if config.metrics_token:
        access = "metrics need the metrics token"
    elif config.public_metrics:
        access = "metrics public"
    else:
        access = (f"metrics for clients of {describe(config.metrics_allow)} only; set --metrics-token, "
                  "--metrics-allow or --public-metrics to open them to others")
    return f"dashboard: {scheme}://{address}:{getattr(host, 'port', '')}/dashboard ({access})"


def upstream(config: Config, url: str, slots: int | None) -> str:
    if slots:
        places = f"{slots} places, configured"
    elif config.max_concurrent:
        places = f"{config.max_concurrent} places, --max-concurrent"
    elif config.upstream_check_interval:
        places = "places read from llama.cpp's /props, else 1"
    else:
        places = "1 place (health checks are off, so llama.cpp's /props is not read)"
    checks = (f"checked every {config.upstream_check_interval:g} s" if config.upstream_check_interval
              else "not checked")
    return f"upstream {redacted(url)}: {places}; {checks}"


def ledger(path: str) -> str:
    """C{path}: a file, a PostgreSQL URL (its password already redacted), or empty for none."""
    if not path:
        return "usage ledger: none (--usage-db)"
    return f"usage ledger: {path if '://' in path else os.path.abspath(path)}"
