"""Run the fake llama.cpp server alone (for benchmarks): python bench/fake_upstream.py PORT [TOKENS]"""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred

from twisted_gw.testing import FakeLlama


async def main(reactor: Any, port: str, tokens: str = "8") -> None:
    fake = FakeLlama(reactor, reply=tuple(f" t{i}" for i in range(int(tokens))))
    await fake.start(port=int(port))
    print("ready", flush=True)
    await Deferred()  # until killed


if __name__ == "__main__":
    task.react(lambda reactor, *a: Deferred.fromCoroutine(main(reactor, *a)), sys.argv[1:])
