"""
A real Redis for the cluster tests: a C{redis-server} of their own on a free loopback port (the binary from
LLMGW_TEST_REDIS_SERVER, else the one on PATH), which a test may stop and start again; or, without a binary, the
server at LLMGW_TEST_REDIS_URL (tests that restart Redis then skip).  Where neither works the tests skip and say
why; under LLMGW_REQUIRE_SERVICES=1 (CI) they fail.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from typing import Optional
from urllib.parse import urlsplit

from support import free_port, missing_service


def _ping(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))  # (up, with or without a password)
    except OSError:
        return False


class RedisServer:
    """One redis-server process on 127.0.0.1 that keeps nothing on disk."""

    def __init__(self, binary: Optional[str], url: Optional[str] = None, extra: tuple[str, ...] = ()) -> None:
        self.binary = binary
        parts = urlsplit(url or "")
        self.host = parts.hostname or "127.0.0.1"
        self.port = free_port() if binary else parts.port or 6379
        self.db = int(parts.path.strip("/") or 0)
        self.password = parts.password
        self._url = url
        self.extra = extra  # more of redis-server's options (TLS, users)
        self.process: Optional[subprocess.Popen[bytes]] = None
        self.folder = tempfile.mkdtemp(prefix="llmgw-redis-")

    @property
    def url(self) -> str:
        return self._url or f"redis://127.0.0.1:{self.port}/0"

    @property
    def restartable(self) -> bool:
        return self.binary is not None

    def start(self) -> None:
        if self.binary is None:
            return
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.folder, *self.extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not _ping("127.0.0.1", self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise missing_service(f"{self.binary} did not start on 127.0.0.1:{self.port}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Gone like a crashed server: SIGKILL (it keeps nothing, so it comes back empty)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None


def redis_server(binary_only: bool = False, extra: tuple[str, ...] = ()) -> RedisServer:
    """A started server for one test (stop it in its cleanup); C{binary_only}: one of its own, with C{extra}."""
    binary = os.environ.get("LLMGW_TEST_REDIS_SERVER") or shutil.which("redis-server")
    if binary:
        server = RedisServer(binary, extra=extra)
        server.start()
        return server
    if binary_only:
        raise missing_service("needs a redis-server binary of its own (LLMGW_TEST_REDIS_SERVER)")
    url = os.environ.get("LLMGW_TEST_REDIS_URL")
    if url:
        parts = urlsplit(url)
        if _ping(parts.hostname or "127.0.0.1", parts.port or 6379):
            return RedisServer(None, url)
        raise missing_service(f"no Redis answers at LLMGW_TEST_REDIS_URL={url}")
    raise missing_service(
        "no redis-server binary (set LLMGW_TEST_REDIS_SERVER, or LLMGW_TEST_REDIS_URL for a running Redis)")


def cluster_name() -> str:
    """A cluster of its own for each test (a shared LLMGW_TEST_REDIS_URL may hold others)."""
    return "test-" + uuid.uuid4().hex[:10]
