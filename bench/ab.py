"""
Two gateway source trees against one upstream, interleaved in blocks: CPU per request and p50.

    git worktree add /tmp/before <commit>
    python bench/ab.py /tmp/before .

Starts the suite's upstream (bench/paced_upstream.py) and `twistd -n llmgw` twice on 127.0.0.1, each with
PYTHONPATH set to one tree, then sends GET /v1/models, a non-stream chat and a stream of 8 chunks on one
keep-alive connection per gateway, alternating blocks of --block requests (the order flipping every block), and
prints each tree's median time, time to the first byte (first data event for the stream) and CPU per request
(from /proc).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import suite  # noqa: E402
from loadgen import NotOK, chat, interleaved  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("trees", nargs=2, help="two source trees (each with twisted_gw/ in it)")
    parser.add_argument("--blocks", type=int, default=20, help="blocks per tree and case")
    parser.add_argument("--block", type=int, default=50,
                        help="requests per block (1: the trees take turns request by request, so each has the "
                             "other's request time to finish what it does after an answer, as in the suite)")
    args = parser.parse_args()
    work = suite.work_folder("ab", "sk-bench")
    upstream = suite.start_upstream(work)
    gateways: list[suite.Server] = []
    try:
        for i, tree in enumerate(args.trees):
            env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
            gateways.append(suite.start_gateway(work, f"gateway{i}", upstream.port, 100, 100, env=env))
        for name, method, path, doc in (("GET /v1/models", "GET", "/v1/models", None),
                                        ("chat non-stream", "POST", "/v1/chat/completions", chat(False)),
                                        ("chat stream", "POST", "/v1/chat/completions", chat(True))):
            try:
                times, firsts, cpu = interleaved([g.port for g in gateways], method, path, doc, args.blocks,
                                                 args.block, cpu=[g.cpu for g in gateways])
            except NotOK as e:
                raise SystemExit(f"{name} via {args.trees[e.index]}: not 200\n{gateways[e.index].log_tail()}") from None
            for i in (0, 1):
                print(f"{name:16s} {args.trees[i]:30s} p50 {statistics.median(times[i]) * 1e3:.3f} ms, first "
                      f"{'data' if doc is not None and doc.get('stream') else 'byte'} p50 "
                      f"{statistics.median(firsts[i]) * 1e3:.3f} ms, CPU per request "
                      f"{cpu[i] / len(times[i]) * 1e6:.0f} us", flush=True)
    finally:
        for g in gateways:
            g.stop()
        upstream.stop()


if __name__ == "__main__":
    main()
