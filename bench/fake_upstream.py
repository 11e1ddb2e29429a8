"""Run the fake llama.cpp server alone (for benchmarks): python bench/fake_upstream.py PORT [TOKENS]"""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred

from twisted_gw.testing import FakeLlama


async def main(reactor: Any, port: str, tokens: str = "8") -> None:
    from twisted.internet import endpoints
    from twisted.web import server

    from twisted_gw.testing import _FakeResource

    fake = FakeLlama(reactor, reply=tuple(f" t{i}" for i in range(int(tokens))))
    site = server.Site(_FakeResource(fake))
    site.noisy = False
    await endpoints.TCP4ServerEndpoint(reactor, int(port), interface="127.0.0.1").listen(site)
    print("ready", flush=True)
    await Deferred()  # until killed


if __name__ == "__main__":
    task.react(lambda reactor, *a: Deferred.fromCoroutine(main(reactor, *a)), sys.argv[1:])
