"""
What sharing the state on Redis adds to a request: one gateway alone against one replica of a cluster, in one run.

    python bench/cluster.py [--blocks 20 --block 50] [--redis-server /usr/bin/redis-server]

Starts the suite's upstream (bench/paced_upstream.py), a redis-server of its own on a free loopback port, and
three `twistd -n llmgw` from this tree: one without --state, and two replicas of one cluster with it (the
measured one and a second that renews its leases beside it). Sends a non-stream chat and a stream of 8 chunks on
one keep-alive connection per target (the upstream directly too), alternating blocks of --block requests, and
prints each target's median time and time to the first byte or data event; the added p50 of --state is the
replica's minus the lone gateway's (target: at most 1 ms). Writes bench/results/cluster.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import suite  # noqa: E402
from loadgen import NotOK, chat, interleaved  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--blocks", type=int, default=20, help="blocks per target and case")
    parser.add_argument("--block", type=int, default=50, help="requests per block")
    parser.add_argument("--redis-server", default=os.environ.get("LLMGW_TEST_REDIS_SERVER")
                        or shutil.which("redis-server") or "/usr/bin/redis-server")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "cluster.json"))
    args = parser.parse_args()
    work = suite.work_folder("cluster", "sk-bench")
    upstream = suite.start_upstream(work)
    redis_port = suite.free_port()
    redis = suite.Server("redis", [args.redis_server, "--port", str(redis_port), "--bind", "127.0.0.1",
                                   "--save", "", "--appendonly", "no", "--dir", work],
                         redis_port, os.path.join(work, "redis.log"))
    servers = [upstream, redis]
    try:
        time.sleep(0.5)
        state = ["--state", f"redis://127.0.0.1:{redis_port}/0", "--cluster", "bench"]
        alone = suite.start_gateway(work, "alone", upstream.port, 100, 100)
        replica = suite.start_gateway(work, "replica", upstream.port, 100, 100, extra=state)
        other = suite.start_gateway(work, "other", upstream.port, 100, 100, extra=state)
        servers += [alone, replica, other]
        time.sleep(1.5)  # (both replicas joined)
        targets = [("direct", upstream.port), ("gateway alone", alone.port), ("replica with --state", replica.port)]
        results: dict[str, dict[str, dict[str, float]]] = {}
        for name, doc in (("chat non-stream", chat(False)), ("chat stream", chat(True))):
            stream = bool(doc.get("stream"))
            try:
                times, firsts, _ = interleaved([port for _, port in targets], "POST", "/v1/chat/completions", doc,
                                               args.blocks, args.block)
            except NotOK as e:
                raise SystemExit(f"{name} via {targets[e.index][0]}: not 200") from None
            results[name] = {}
            for i, (target, _) in enumerate(targets):
                p50, first = statistics.median(times[i]) * 1e3, statistics.median(firsts[i]) * 1e3
                results[name][target] = {"p50_ms": round(p50, 3), "first_p50_ms": round(first, 3)}
                print(f"{name:16s} {target:22s} p50 {p50:.3f} ms, first {'data' if stream else 'byte'} p50 "
                      f"{first:.3f} ms", flush=True)
            added = results[name]["replica with --state"]["p50_ms"] - results[name]["gateway alone"]["p50_ms"]
            results[name]["added_by_state_ms"] = {"p50_ms": round(added, 3)}
            print(f"{name:16s} added by --state: {added:+.3f} ms (target: at most +1 ms)", flush=True)
        with open(args.out, "w") as f:
            json.dump({"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                       "requests_per_target_and_case": args.blocks * args.block, "results": results}, f, indent=2)
            f.write("\n")
    finally:
        for server in reversed(servers):
            server.stop()


if __name__ == "__main__":
    main()
