"""
Fixtures for the opt-in integration suite: a real llama.cpp server with a real
model, and the real gateway (`twistd -n llmgw`) in front of it, all on loopback.

Run with `tox -e integration` (see the README); without LLMGW_INTEGRATION=1 the
suite is skipped.  Not part of the default test run (`tox` runs tests/ only).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from twisted_gw.testing import LlamaServer

ENABLED = os.environ.get("LLMGW_INTEGRATION") == "1"
KEYS = {"sk-int-alice": "alice", "sk-int-bob": "bob"}
BIN = os.path.dirname(sys.executable)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if ENABLED:
        return
    skip = pytest.mark.skip(reason="integration suite: run `tox -e integration` (sets LLMGW_INTEGRATION=1)")
    here = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        if str(item.path).startswith(here + os.sep):
            item.add_marker(skip)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(url: str, ok: Callable[[httpx.Response], bool], seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if ok(httpx.get(url, timeout=2)):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not come up in {seconds} s")


@pytest.fixture(scope="session")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real llama-server with 2 slots; its base URL."""
    server = LlamaServer(free_port(), str(tmp_path_factory.mktemp("llama") / "llama.log"))
    try:
        yield server.start()
    finally:
        server.stop()


class Gateway:
    def __init__(self, url: str, proc: subprocess.Popen[str], workdir: str) -> None:
        self.url = url
        self.proc = proc
        self.workdir = workdir

    def metrics(self) -> dict:
        return httpx.get(self.url + "/metrics", timeout=10).json()


@pytest.fixture
def start_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Gateway]]:
    """Starts `twistd -n llmgw` subprocesses in front of an upstream; stops them afterwards."""
    started: list[Gateway] = []

    def start(upstream: str, *args: str) -> Gateway:
        workdir = tmp_path_factory.mktemp("gateway")
        (workdir / "users.json").write_text(json.dumps(KEYS))
        port = free_port()
        proc = subprocess.Popen(
            [os.path.join(BIN, "twistd"), "-n", "--pidfile=", "llmgw", "--listen", f"tcp:{port}:interface=127.0.0.1",
             "--upstream", upstream, *args],
            cwd=workdir, stdout=open(workdir / "gateway.log", "w"), stderr=subprocess.STDOUT, text=True,
        )
        gateway = Gateway(f"http://127.0.0.1:{port}", proc, str(workdir))
        started.append(gateway)
        wait_for(gateway.url + "/health", lambda r: r.status_code == 200, 60)
        return gateway

    yield start
    for gateway in started:
        gateway.proc.terminate()
        gateway.proc.wait(30)
