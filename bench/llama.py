"""
Tokens per second through the gateway against a real llama-server, beside the server alone.

    python bench/llama.py [--clients 8] [--slots 2] [--tokens 128] [--rounds 3] [--json out.json]

Needs the integration env's server and model (python integration/install_llama.py).  Starts on 127.0.0.1 a
llama-server with --slots slots (Gemma 3 270M) and `twistd -n llmgw` in front of it (its places read from the
server's /props), then runs rounds in which --clients streaming chat clients ask at once for --tokens tokens each
(ignore_eos, so every answer has that length), once direct and once through the gateway, the order alternating
round by round.  A round's rate is the completion tokens the server reported (include_usage) over the time from the
first request to the last answer.  Prints each round and the medians; the budget is gateway >= 98% of direct.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from suite import free_port, log, start_gateway, work_folder

from twisted_gw.testing import LlamaServer

KEY = "sk-bench-llama"


def stream_one(base: str, i: int, tokens: int) -> int:
    """One streaming chat; the completion tokens the server reported."""
    body = {
        "model": "gemma", "stream": True, "stream_options": {"include_usage": True}, "max_tokens": tokens,
        "ignore_eos": True, "temperature": 0.8, "seed": i,
        "messages": [{"role": "user", "content": f"Tell story number {i} about a lighthouse."}],
    }
    used = 0
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=300,
                      headers={"Authorization": f"Bearer {KEY}"}) as answer:
        answer.raise_for_status()
        for line in answer.iter_lines():
            if line.startswith("data: {") and '"usage"' in line:
                usage = json.loads(line[6:]).get("usage") or {}
                used = int(usage.get("completion_tokens", used))
    return used


def round_rate(base: str, clients: int, tokens: int) -> dict[str, float]:
    start = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        counts = list(pool.map(lambda i: stream_one(base, i, tokens), range(clients)))
    seconds = time.monotonic() - start
    return {"tokens": sum(counts), "seconds": seconds, "tokens_per_s": sum(counts) / seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    work = work_folder("llama", KEY)
    log(f"work folder {work}")
    server = LlamaServer(free_port(), os.path.join(work, "llama.log"), slots=args.slots)
    direct = server.start()
    gateway = None
    try:
        # as a user runs it: places read from the server's /props by the health checks
        gateway = start_gateway(work, "gateway", server.port, "auto", 1000, extra=("--upstream-check-interval", "5"))
        paths = {"direct": direct, "gateway": f"http://127.0.0.1:{gateway.port}"}
        deadline = time.monotonic() + 30
        while httpx.get(paths["gateway"] + "/metrics").json()["queue"]["max_concurrent"] != args.slots:
            if time.monotonic() > deadline:
                raise SystemExit("the gateway did not read the server's slots from /props")
            time.sleep(0.1)
        for path in paths.values():  # warm up: the model's pages in memory, connections made
            round_rate(path, args.slots, 8)
        rounds: list[dict[str, Any]] = []
        for n in range(args.rounds):
            order = ["direct", "gateway"] if n % 2 == 0 else ["gateway", "direct"]
            result = {path: round_rate(paths[path], args.clients, args.tokens) for path in order}
            rounds.append(result)
            log(f"round {n + 1}: " + ", ".join(f"{p} {result[p]['tokens_per_s']:.1f} tokens/s"
                                               f" ({result[p]['tokens']:.0f} tokens)" for p in ("direct", "gateway")))
        medians = {p: statistics.median(r[p]["tokens_per_s"] for r in rounds) for p in paths}
        ratio = medians["gateway"] / medians["direct"]
        print(f"real llama-server, {args.clients} streaming clients on {args.slots} slots, {args.tokens} tokens each, "
              f"median of {args.rounds} interleaved rounds: direct {medians['direct']:.1f} tokens/s, "
              f"gateway {medians['gateway']:.1f} tokens/s = {ratio:.1%} of direct "
              f"(target >= 98%: {'met' if ratio >= 0.98 else 'NOT met'})")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "rounds": rounds, "median_tokens_per_s": medians, "ratio": ratio,
                           "met": ratio >= 0.98}, f, indent=2)
        return 0
    finally:
        if gateway is not None:
            gateway.stop()
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
