"""
The spread of the one-connection latency rows over many suite runs, one command.

    python bench/spread.py [RUNS] [--tree TREE ...]

Runs `bench/suite.py --cases 1,3` RUNS times (default 10; each starts its own upstream, nginx and gateway on
127.0.0.1 and takes medians of 3 rounds of 500 requests), and prints for each run the gateway's added p50 for a
model list, a non-stream chat and a stream's first data, direct's chat p50 and the CPU per chat of the gateway and
of the upstream (which tell a slow minute of the VM from a slow gateway); then, per row, the range, the median and
how many runs were within the target.  With several --tree, the trees take turns run by run (each with
PYTHONPATH set to it, its own bench/suite.py run), so that they share the same minutes as far as runs can.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

ROWS = (
    ("models", "1 GET /v1/models", "added p50 ms"),
    ("chat", "1 chat non-stream", "added p50 ms"),
    ("stream TTFB", "3 chat stream (8 chunks)", "added TTFB p50 ms"),
)
TARGET_MS = 0.5


def one_run(tree: str, out: str) -> dict[str, float]:
    """One quick suite run of cases 1 and 3 with C{tree}'s code: the numbers this script prints."""
    env = dict(os.environ, PYTHONPATH=tree)
    subprocess.run([sys.executable, os.path.join(tree, "bench", "suite.py"), "--cases", "1,3", "--json", out],
                   cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    with open(out) as f:
        rows = {(r["case"], r["metric"]): r["values"] for r in json.load(f)["rows"]}
    numbers = {name: rows[(case, metric)]["gateway"] for name, case, metric in ROWS}
    numbers["direct chat p50"] = rows[("1 chat non-stream", "p50 ms")]["direct"]
    cpu = rows[("1 chat non-stream", "CPU us/request")]
    numbers["gateway CPU/chat"] = cpu["gateway"]
    numbers["upstream CPU/chat"] = cpu["direct"]
    return numbers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("runs", nargs="?", type=int, default=10, help="runs per tree")
    parser.add_argument("--tree", action="append", help="a source tree (default: this one); repeat to take turns")
    args = parser.parse_args()
    trees = [os.path.abspath(t) for t in (args.tree or [ROOT])]
    results: dict[str, list[dict[str, float]]] = {t: [] for t in trees}
    with tempfile.TemporaryDirectory() as work:
        out = os.path.join(work, "run.json")
        for run in range(args.runs):
            for tree in trees:
                numbers = one_run(tree, out)
                results[tree].append(numbers)
                label = f"{os.path.basename(tree) or tree:12s} " if len(trees) > 1 else ""
                print(f"{label}run {run + 1:2d}: added p50 models {numbers['models']:.3f}, chat {numbers['chat']:.3f}, "
                      f"stream TTFB {numbers['stream TTFB']:.3f} ms | direct chat {numbers['direct chat p50']:.3f} ms "
                      f"| CPU per chat: gateway {numbers['gateway CPU/chat']:.0f} us, upstream "
                      f"{numbers['upstream CPU/chat']:.0f} us", flush=True)
    for tree in trees:
        runs = results[tree]
        print(f"\n{tree}: {len(runs)} runs")
        for name, _, _ in ROWS:
            values = [r[name] for r in runs]
            within = sum(v <= TARGET_MS for v in values)
            print(f"  {name:12s} added p50 {min(values):+.3f} to {max(values):+.3f} ms, "
                  f"median {statistics.median(values):+.3f} ({within}/{len(values)} within +{TARGET_MS} ms)")


if __name__ == "__main__":
    main()
