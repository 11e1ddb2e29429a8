"""
CPU instructions per request of one or more gateway source trees: a count that does not move with the VM's noise.

    python bench/instructions.py [TREE ...] [--cases models,chat,stream] [--requests 100 400]

For each tree (default: this one) and case, runs `twistd -n llmgw` under valgrind's cachegrind (instruction
counts only, no cache simulation) in front of the suite's upstream (bench/paced_upstream.py), twice: once
answering the first count of requests on one keep-alive connection, once the second count, and prints the
difference divided by the difference in requests: start-up and shutdown cancel out.  The count includes what
the gateway does after an answer (its books).  Deterministic to about 0.3% between runs; about 50 times slower
than running natively, so the counts are kept small.  Needs valgrind (Debian `valgrind`).  Nothing leaves
127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import suite  # noqa: E402
from loadgen import BlockingClient, build_request, chat  # noqa: E402

CASES = {
    "models": ("GET", "/v1/models", None),
    "chat": ("POST", "/v1/chat/completions", chat(False)),
    "stream": ("POST", "/v1/chat/completions", chat(True)),
}


def instructions(tree: str, case: str, requests: int, upstream: int, work: str) -> int:
    """Instructions the gateway ran, start to exit, answering C{requests} of C{case}."""
    port = suite.free_port()
    out = os.path.join(work, f"cachegrind.{case}.{requests}.{os.path.basename(os.path.abspath(tree))}")
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    cmd = ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--branch-sim=no", f"--cachegrind-out-file={out}",
           sys.executable, twistd, "-n", "--pidfile=", "llmgw",
           "--listen", f"tcp:{port}:interface=127.0.0.1", "--upstream", f"http://127.0.0.1:{upstream}",
           "--usage-db", "none", "--users", os.path.join(work, "users.json"),
           "--max-concurrent", "100", "--max-queue", "100", "--upstream-check-interval", "0"]
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
    with open(os.path.join(work, "gateway.log"), "a") as log:
        gateway = subprocess.Popen(cmd, env=env, cwd=work, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if gateway.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the gateway did not start (see {work}/gateway.log)") from None
                time.sleep(0.5)
        method, path, doc = CASES[case]
        raw = build_request(method, path, port, doc)
        client = BlockingClient(port)
        for _ in range(requests):
            if client.request(raw)[0].status != 200:
                raise SystemExit(f"{case} via {tree}: not 200 (see {work}/gateway.log)")
        client.close()
        time.sleep(0.5)  # the last answer's books
    finally:
        gateway.terminate()
        gateway.wait(timeout=300)
    with open(out) as f:
        found = re.search(r"^summary:\s+(\d+)", f.read(), re.MULTILINE)
    if found is None:
        raise SystemExit(f"no summary in {out}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("trees", nargs="*", default=[os.path.dirname(HERE)], help="source trees (default: this one)")
    parser.add_argument("--cases", default="models,chat,stream", help="of: " + ", ".join(CASES))
    parser.add_argument("--requests", type=int, nargs=2, default=(100, 400), metavar=("FEW", "MANY"))
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (Debian: apt-get install valgrind)")
    few, many = args.requests
    if not 0 < few < many:
        raise SystemExit("--requests: two counts, the first smaller")
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    for case in cases:
        if case not in CASES:
            raise SystemExit(f"unknown case {case!r}")
    work = tempfile.mkdtemp(prefix="llmgw-instructions-")
    with open(os.path.join(work, "users.json"), "w") as f:
        json.dump({"users": {"bench": {"keys": ["sk-bench"]}}}, f)
    upstream = suite.start_upstream(work)
    try:
        for case in cases:
            for tree in args.trees:
                counts = [instructions(tree, case, n, upstream.port, work) for n in (few, many)]
                per_request = (counts[1] - counts[0]) / (many - few)
                print(f"{case:7s} {tree:30s} {per_request / 1000:8.1f} k instructions per request", flush=True)
    finally:
        upstream.stop()


if __name__ == "__main__":
    main()
