"""
Cache-aware routing against least-busy, on three real llama-servers.

    python bench/routing.py [--users 4] [--turns 6] [--words 1500] [--tokens 24] [--json out.json]

Needs the integration env's server and model (python integration/install_llama.py).  Starts on 127.0.0.1 three
llama-servers (Gemma 3 270M, one slot each, --ctx-size 8192) and, for each mode, `twistd -n llmgw` in front of all
three with --routing least-busy, then cache-aware.  The workload is fixed: --users users, each with a system
prompt of its own (--words words), --turns turns each, the users' turns interleaved, one request at a time,
streamed, --tokens tokens an answer (temperature 0).  Each mode gets system prompts it has never seen (so neither
starts from the other's caches).  Reported per mode: the prompt tokens the servers evaluated (timings.prompt_n),
time to first token (mean, p50, p95) and the wall time.  Targets: cache-aware evaluates at most half the prompt
tokens of least-busy, its TTFT mean is at most 60% of least-busy's, and its wall time is not longer.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from typing import Any

import httpx
from suite import free_port, log, start_gateway, work_folder

from twisted_gw.testing import LlamaServer

KEY = "sk-bench-routing"
WORDS = ("river", "stone", "garden", "lantern", "harbor", "meadow", "copper", "violet", "thunder", "orchard",
         "compass", "island", "silver", "forest", "canyon", "ember", "glacier", "falcon", "willow", "marble")


def system_prompt(seed: str, words: int) -> str:
    rng = random.Random(seed)
    return f"You are assistant {seed}. Remember these notes. " + " ".join(rng.choice(WORDS) for _ in range(words))


def turn(base: str, messages: list[dict[str, str]], tokens: int) -> dict[str, Any]:
    """One streamed turn: its answer, time to first token, and the server's timings."""
    body = {"model": "gemma", "stream": True, "max_tokens": tokens, "temperature": 0, "messages": messages}
    start = time.monotonic()
    ttft = None
    text = ""
    timings: dict[str, Any] = {}
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=600,
                      headers={"Authorization": f"Bearer {KEY}"}) as answer:
        answer.raise_for_status()
        for line in answer.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    text += piece
                    if ttft is None:
                        ttft = time.monotonic() - start
            timings = chunk.get("timings") or timings
    return {"text": text, "ttft": ttft if ttft is not None else time.monotonic() - start,
            "prompt_n": int(timings.get("prompt_n", 0)), "cache_n": int(timings.get("cache_n", 0))}


def run(base: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    conversations = {user: [{"role": "system", "content": system_prompt(f"{mode}-{user}", args.words)}]
                     for user in range(args.users)}
    results = []
    start = time.monotonic()
    for t in range(args.turns):
        for user, messages in conversations.items():
            messages.append({"role": "user", "content": f"Question {t}: name one of the notes, please."})
            found = turn(base, messages, args.tokens)
            messages.append({"role": "assistant", "content": found["text"]})
            results.append({"user": user, "turn": t, **found})
            log(f"{mode} user {user} turn {t}: ttft {found['ttft']:.2f} s, evaluated {found['prompt_n']}, "
                f"cached {found['cache_n']}")
    wall = time.monotonic() - start
    ttfts = sorted(r["ttft"] for r in results)
    return {
        "prompt_tokens_evaluated": sum(r["prompt_n"] for r in results),
        "ttft_mean": statistics.mean(ttfts), "ttft_p50": ttfts[len(ttfts) // 2],
        "ttft_p95": ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))], "wall_s": wall, "requests": results,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--words", type=int, default=1500)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    work = work_folder("routing", KEY)
    log(f"work folder {work}")
    servers = [LlamaServer(free_port(), os.path.join(work, f"llama{i}.log"), slots=1, extra=("--ctx-size", "8192"))
               for i in range(3)]
    for server in servers:
        server.start()
    modes: dict[str, Any] = {}
    try:
        for mode in ("least-busy", "cache-aware"):
            more = [f"--upstream=http://127.0.0.1:{s.port}" for s in servers[1:]]
            gateway = start_gateway(work, mode, servers[0].port, "auto", 1000,
                                    extra=("--routing", mode, "--upstream-check-interval", "5", *more))
            try:
                base = f"http://127.0.0.1:{gateway.port}"
                deadline = time.monotonic() + 30
                while httpx.get(base + "/metrics").json()["queue"]["max_concurrent"] != 3:
                    if time.monotonic() > deadline:
                        raise SystemExit("the gateway did not see the three servers up")
                    time.sleep(0.1)
                modes[mode] = run(base, mode, args)
                modes[mode]["routing"] = httpx.get(base + "/metrics").json()["routing"]["decisions"]
            finally:
                gateway.stop()
        lb, ca = modes["least-busy"], modes["cache-aware"]
        targets = {
            "prompt_tokens_at_most_half": ca["prompt_tokens_evaluated"] <= 0.5 * lb["prompt_tokens_evaluated"],
            "ttft_mean_at_most_60_percent": ca["ttft_mean"] <= 0.6 * lb["ttft_mean"],
            "wall_time_not_longer": ca["wall_s"] <= lb["wall_s"],
        }
        for mode, m in modes.items():
            print(f"{mode}: prompt tokens evaluated {m['prompt_tokens_evaluated']}, TTFT mean {m['ttft_mean']:.2f} s "
                  f"p50 {m['ttft_p50']:.2f} s p95 {m['ttft_p95']:.2f} s, wall {m['wall_s']:.1f} s, "
                  f"routing {m['routing']}")
        print("targets: " + ", ".join(f"{name} {'met' if ok else 'NOT met'}" for name, ok in targets.items()))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "modes": modes, "targets": targets}, f, indent=2)
        return 0
    finally:
        for server in servers:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
