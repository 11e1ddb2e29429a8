"""
Latency and CPU of the gateway against talking to the upstream directly, in the same run.

Starts on loopback, each in its own process, the fake llama.cpp server and
`twistd -n llmgw` in front of it, then from this process (plain blocking HTTP,
one keep-alive connection, so the client adds little) measures, direct and
through the gateway, interleaved, N requests each:

- GET /v1/models (a small non-stream answer),
- POST /v1/chat/completions non-stream (assembled from a stream by the gateway),
- POST /v1/chat/completions stream: time to the first body byte and to the end,

and the gateway process's CPU time per request (from /proc).  Prints a table
and writes it as JSON (--json PATH) for comparison between commits.

    python bench/compare.py [--requests 500] [--json out.json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
KEY = "sk-bench"
CHAT = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
STREAM = json.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_up(port: int) -> None:
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def timed(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None) -> tuple[float, float]:
    """(seconds to the first body byte, seconds to the end)."""
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    start = time.perf_counter()
    conn.request(method, path, body=body, headers=headers)
    response = conn.getresponse()
    first = response.read(1)
    ttfb = time.perf_counter() - start
    rest = response.read()
    assert response.status == 200 and (first + rest), (response.status, rest[:200])
    return ttfb, time.perf_counter() - start


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--json")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="llmgw-bench-")
    with open(os.path.join(work, "users.json"), "w") as f:
        json.dump({KEY: "bench"}, f)
    up_port, gw_port = free_port(), free_port()
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "fake_upstream.py"), str(up_port)],
                              stdout=subprocess.DEVNULL)]
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    procs.append(subprocess.Popen(
        [twistd, "-n", "--pidfile=", "llmgw", "--listen", f"tcp:{gw_port}:interface=127.0.0.1",
         "--upstream", f"http://127.0.0.1:{up_port}", "--max-concurrent", "4", "--usage-db", "none",
         "--upstream-check-interval", "0"],
        cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    ))
    try:
        wait_up(up_port)
        wait_up(gw_port)
        direct = http.client.HTTPConnection("127.0.0.1", up_port, timeout=30)
        gateway = http.client.HTTPConnection("127.0.0.1", gw_port, timeout=30)
        cases = [
            ("GET /v1/models", "GET", "/v1/models", None),
            ("chat, non-stream", "POST", "/v1/chat/completions", CHAT),
            ("chat, stream", "POST", "/v1/chat/completions", STREAM),
        ]
        for _, method, path, body in cases:  # warm up both paths
            for conn in (direct, gateway):
                for _ in range(20):
                    timed(conn, method, path, body)
        rows = []
        for name, method, path, body in cases:
            times: dict[str, list[tuple[float, float]]] = {"direct": [], "gateway": []}
            cpu_before = cpu_seconds(procs[1].pid)
            for _ in range(args.requests):  # interleaved, so both see the same machine
                times["direct"].append(timed(direct, method, path, body))
                times["gateway"].append(timed(gateway, method, path, body))
            cpu = (cpu_seconds(procs[1].pid) - cpu_before) / args.requests
            row = {"case": name, "requests": args.requests, "gateway_cpu_us_per_request": round(cpu * 1e6, 1)}
            for who, samples in times.items():
                total = [t for _, t in samples]
                first = [f for f, _ in samples]
                row[f"{who}_p50_ms"] = round(statistics.median(total) * 1e3, 3)
                row[f"{who}_p99_ms"] = round(pct(total, 0.99) * 1e3, 3)
                row[f"{who}_ttfb_p50_ms"] = round(statistics.median(first) * 1e3, 3)
            row["added_p50_ms"] = round(row["gateway_p50_ms"] - row["direct_p50_ms"], 3)
            row["added_ttfb_p50_ms"] = round(row["gateway_ttfb_p50_ms"] - row["direct_ttfb_p50_ms"], 3)
            rows.append(row)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
    print(f"{'case':<18} {'direct p50':>10} {'gw p50':>8} {'added':>7} {'direct p99':>10} {'gw p99':>8} "
          f"{'added TTFB':>10} {'gw CPU/req':>10}")
    for r in rows:
        print(f"{r['case']:<18} {r['direct_p50_ms']:>8.3f}ms {r['gateway_p50_ms']:>6.3f}ms {r['added_p50_ms']:>5.3f}ms "
              f"{r['direct_p99_ms']:>8.3f}ms {r['gateway_p99_ms']:>6.3f}ms {r['added_ttfb_p50_ms']:>8.3f}ms "
              f"{r['gateway_cpu_us_per_request']:>8.0f}us")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": os.uname().machine, "cpus": os.cpu_count(), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
