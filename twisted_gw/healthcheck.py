"""
The container's health check: ask the gateway's own first TCP or TLS listener
(from C{LISTEN}, as the gateway reads it) for C{/health?upstreams=1}.

    python -m twisted_gw.healthcheck          # exit 0: up with an upstream; 1: not

It runs as its own short process (Docker's C{HEALTHCHECK}), never in the gateway.
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Optional

from twisted_gw.config import LISTEN_DEFAULT, LISTEN_ENV, ConfigError, listen_list
from twisted_gw.tls import split_description

PROG = "llmgw-healthcheck"
WILDCARDS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


def health_url(listen: Sequence[str]) -> Optional[str]:
    """The C{/health?upstreams=1} URL of the first C{tcp:} or C{ssl:} listener, on loopback when it listens on all."""
    for description in listen:
        parts = split_description(description)
        if parts[0] not in ("tcp", "ssl") or len(parts) < 2:
            continue
        port = parts[1].removeprefix("port=")
        options = dict(p.split("=", 1) for p in parts[2:] if "=" in p)
        host = options.get("interface", "")
        host = WILDCARDS.get(host, host)
        if ":" in host:
            host = f"[{host}]"
        scheme = "https" if parts[0] == "ssl" else "http"
        return f"{scheme}://{host}:{port}/health?upstreams=1"
    return None


def check(url: str, timeout: float = 4.0) -> tuple[bool, str]:
    """Whether C{url} answers 200, and what to print."""
    # a check of our own listener over loopback: its certificate names the LAN host, not 127.0.0.1
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as reply:
            return reply.status == 200, f"{url}: {reply.status}"
    except urllib.error.HTTPError as e:
        return False, f"{url}: {e.code} {e.read(200).decode('utf-8', 'replace')}"
    except (OSError, ValueError) as e:
        return False, f"{url}: {e}"


def main(environ: Optional[Mapping[str, str]] = None) -> int:
    env = os.environ if environ is None else environ
    try:
        url = health_url(listen_list(env.get(LISTEN_ENV) or LISTEN_DEFAULT))
    except ConfigError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    if url is None:
        print(f"{PROG}: no tcp: or ssl: listener in {LISTEN_ENV} to check", file=sys.stderr)
        return 1
    healthy, said = check(url)
    print(said, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
