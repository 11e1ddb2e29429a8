"""
What assembling a non-streaming answer costs: the gateway with --assemble-non-stream auto (the default; the
suite's upstream says it is llama.cpp, so a non-stream chat goes upstream as a stream and is assembled) and
with never (passed through as it is), against the upstream directly, answering at once and streaming.

    python bench/assembly.py [--requests N] [--rounds R]

Starts on 127.0.0.1 the suite's upstream (bench/paced_upstream.py) and two gateways in front of it, then sends
the suite's non-stream chat on one keep-alive connection per path, the paths taking turns request by request
(the order rotating), and prints each path's p50 and its added p50 over direct (median of the rounds).  The
difference between "direct, streaming to the end" and "direct" is what the upstream itself takes longer to
stream an answer than to send it at once: part of the assembled row's added time that is not the gateway's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import suite  # noqa: E402
from loadgen import BlockingClient, build_request, chat  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--requests", type=int, default=500, help="requests per path and round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="llmgw-assembly-")
    with open(os.path.join(work, "users.json"), "w") as f:
        json.dump({"users": {"bench": {"keys": ["sk-bench"]}}}, f)
    upstream = suite.start_upstream(work)
    gateways = []
    try:
        for mode in ("auto", "never"):
            gateways.append(suite.start_gateway(work, f"gateway-{mode}", upstream.port, 100, 100,
                                                extra=["--assemble-non-stream", mode]))
        paths = {
            "direct": (upstream.port, chat(False)),
            "direct, streaming to the end": (upstream.port, chat(True)),
            "gateway, assembled (auto)": (gateways[0].port, chat(False)),
            "gateway, passed through (never)": (gateways[1].port, chat(False)),
        }
        names = list(paths)
        clients = {name: BlockingClient(port) for name, (port, _) in paths.items()}
        raws = {name: build_request("POST", "/v1/chat/completions", port, doc) for name, (port, doc) in paths.items()}
        for name in names:  # warm up
            for _ in range(50):
                clients[name].request(raws[name])
        rounds: list[dict[str, float]] = []
        for r in range(args.rounds):
            times: dict[str, list[float]] = {name: [] for name in names}
            for i in range(args.requests):
                for name in suite.rotate(names, i + r):
                    response, start, end = clients[name].request(raws[name])
                    if response.status != 200:
                        raise SystemExit(f"{name}: status {response.status}")
                    times[name].append(end - start)
            rounds.append({name: statistics.median(t) * 1e3 for name, t in times.items()})
        p50 = {name: statistics.median(rd[name] for rd in rounds) for name in names}
        print(f"non-stream chat, 1 connection, median of {args.rounds} rounds of {args.requests}:")
        for name in names:
            added = "" if name == "direct" else f"   added {p50[name] - p50['direct']:+.3f} ms"
            print(f"  {name:34s} p50 {p50[name]:.3f} ms{added}")
    finally:
        for g in gateways:
            g.stop()
        upstream.stop()


if __name__ == "__main__":
    main()
