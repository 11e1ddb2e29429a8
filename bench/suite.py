"""
The performance suite: direct to the upstream, through nginx and through the gateway, in one run.

    python bench/suite.py [--quick] [--json out.json] [--skip-nginx] [...]

Starts on 127.0.0.1, each in its own process: a fast llama.cpp-like upstream
(bench/paced_upstream.py), nginx as a plain streaming proxy in front of it
(from bench/nginx.conf.template, in a temporary prefix, when nginx is installed
and not --skip-nginx) and `twistd -n llmgw` in front of it.  The load comes from
this process (one-connection latency) and from forked worker processes
(bench/loadgen.py).  The three paths are interleaved (request by request for
latency, run by run for loads, the order rotating) and loads are repeated
(medians).  Cases:

1. non-stream latency on one keep-alive connection (GET /v1/models, chat),
   added ms and server CPU per request (from /proc/PID/stat);
2. fixed-rate open-loop load (non-stream chat): achieved rate, p50/p99;
3. stream time to the first data event, one connection;
4. paced streams (one chunk every 20 ms per stream): % of the offered chunks
   delivered in the window, p99 of each stream's longest gap;
5. unpaced chunk throughput: chunks/s and CPU us per relayed chunk;
6. streaming clients held in the gateway's queue (--max-concurrent 1, one
   stream holding the place): RSS per waiting client, /health latency while
   they wait (polls spread over a keepalive round), time for the queue to
   empty when they all leave at once (bounded: --drain-timeout and
   --max-gateway-rss-mb), RSS after; a second wave tells a leak from the
   allocator's high-water mark.

Prints one table (with the budget's targets) and writes everything as JSON.
Warns when the numbers look unreliable: direct not beating the gateway, direct
short of the offered rate, a load worker on the CPU most of its run, the VM
losing CPU time to steal.  Every load is bounded in count and time; nothing
leaves loopback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional

import loadgen
from loadgen import BlockingClient, Workers, build_request, chat, pct, run_workers

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PATHS = ("direct", "nginx", "gateway")
NOFILE = 65536


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def work_folder(name: str, key: str) -> str:
    """A new folder for a run's servers, logs and users file (one user, C{bench}, with C{key})."""
    work = tempfile.mkdtemp(prefix=f"llmgw-{name}-")
    with open(os.path.join(work, "users.json"), "w") as f:
        json.dump({"users": {"bench": {"keys": [key]}}}, f)
    return work


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """
    CPU time of C{pid}, all its threads: from /proc/PID/task/*/schedstat (run
    time in ns) where the kernel has it, else utime + stime of /proc/PID/stat
    (10 ms ticks: too coarse for a few hundred sub-millisecond requests).
    """
    try:
        total = 0
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def steal_seconds() -> float:
    """CPU time the hypervisor took from this VM, all CPUs (the 'steal' column of /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def children_of(pid: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(name))
            except (OSError, ValueError, IndexError):
                continue
    return found


def raise_nofile(limit: int = NOFILE) -> int:
    """Raise this process's (and so its children's) open-file limit as far as allowed; the soft limit."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for wanted in (max(limit, hard), hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(wanted, hard)))
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _preexec() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Server:
    """One server process; CPU and memory read from /proc for C{pids} (nginx: its worker)."""

    def __init__(self, name: str, cmd: list[str], port: int, logfile: str, cwd: Optional[str] = None,
                 env: Optional[dict[str, str]] = None) -> None:
        self.name = name
        self.port = port
        self.logfile = logfile
        self.cmd = cmd
        with open(logfile, "wb") as out:
            self.proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, preexec_fn=_preexec, env=env)
        self.pids = [self.proc.pid]

    def wait_up(self, path: str = "/health", timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                client = BlockingClient(self.port, timeout=2)
                response, _, _ = client.request(build_request("GET", path, self.port))
                client.close()
                if response.status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise SystemExit(f"{self.name} did not answer {path} on {self.port}:\n{self.log_tail()}")

    def cpu(self) -> float:
        return sum(cpu_seconds(p) for p in self.pids)

    def rss_kb(self) -> int:
        return sum(rss_kb(p) for p in self.pids)

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.logfile, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_upstream(work: str) -> Server:
    port = free_port()
    server = Server("upstream", [sys.executable, os.path.join(HERE, "paced_upstream.py"), "--port", str(port)],
                    port, os.path.join(work, "upstream.log"))
    server.wait_up()
    return server


def start_gateway(work: str, name: str, upstream: int, max_concurrent: int | str, max_queue: int,
                  env: Optional[dict[str, str]] = None, extra: Sequence[str] = ()) -> Server:
    """
    C{twistd -n llmgw} in front of C{upstream}; C{env}: its environment (another source tree on PYTHONPATH);
    C{extra}: more options.
    """
    port = free_port()
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    if not os.path.exists(twistd):
        twistd = shutil.which("twistd") or "twistd"
    cmd = [twistd, "-n", "--pidfile=", "llmgw",
           "--listen", f"tcp:{port}:interface=127.0.0.1", "--upstream", f"http://127.0.0.1:{upstream}",
           "--usage-db", "none", "--users", os.path.join(work, "users.json"),
           "--max-concurrent", str(max_concurrent), "--max-queue", str(max_queue),
           "--upstream-check-interval", "0", *extra]
    server = Server(name, cmd, port, os.path.join(work, f"{name}.log"), cwd=work, env=env)
    server.wait_up()
    return server


def start_nginx(work: str, upstream: int) -> Optional[Server]:
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if nginx is None:
        return None
    prefix = os.path.join(work, "nginx")
    os.makedirs(prefix)
    os.chmod(work, 0o755)
    os.chmod(prefix, 0o755)
    port = free_port()
    with open(os.path.join(HERE, "nginx.conf.template")) as f:
        conf = f.read()
    for key, value in {"@PREFIX@": prefix, "@LISTEN_PORT@": str(port), "@UPSTREAM_PORT@": str(upstream),
                       "@NOFILE@": str(NOFILE), "@CONNECTIONS@": str(NOFILE // 2 - 100)}.items():
        conf = conf.replace(key, value)
    path = os.path.join(prefix, "nginx.conf")
    with open(path, "w") as f:
        f.write(conf)
    server = Server("nginx", [nginx, "-p", prefix, "-c", path, "-e", os.path.join(prefix, "error.log")],
                    port, os.path.join(prefix, "stdout.log"))
    server.wait_up()
    workers = children_of(server.proc.pid)
    server.pids = workers or [server.proc.pid]
    return server


def nginx_version() -> Optional[str]:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    try:
        out = subprocess.run([nginx, "-v"], capture_output=True, text=True, timeout=10)
    except OSError:
        return None
    return (out.stderr or out.stdout).strip().rpartition("/")[2] or None


def git_info() -> dict[str, Any]:
    def run(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True, timeout=10).stdout.strip()
        except OSError:
            return ""
    return {"commit": run("rev-parse", "--short", "HEAD"),
            "dirty_files": [line[3:] for line in run("status", "--porcelain", "--", "twisted_gw").splitlines()]}


def median(values: Sequence[float]) -> float:
    clean = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(clean) if clean else math.nan


def rotate(names: Sequence[str], by: int) -> list[str]:
    by %= len(names)
    return list(names[by:]) + list(names[:by])


# --- the rows of the table ---------------------------------------------------------------------------------------


class Report:
    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = list(paths)
        self.rows: list[dict[str, Any]] = []
        self.warnings: list[str] = []
        self.raw: dict[str, Any] = {}

    def row(self, case: str, metric: str, values: dict[str, Any], *, ratios: bool = True,
            target: str = "", met: Optional[bool] = None, digits: int = 2) -> None:
        self.rows.append({"case": case, "metric": metric, "values": values, "ratios": ratios,
                          "target": target, "met": met, "digits": digits})

    def warn(self, message: str) -> None:
        log("WARNING: " + message)
        if message not in self.warnings:
            self.warnings.append(message)

    def table(self) -> str:
        def fmt(v: Any, digits: int) -> str:
            if v is None or (isinstance(v, float) and math.isnan(v)):
                return "-"
            if isinstance(v, float) and abs(v) >= 1000:
                return f"{v:,.0f}"
            return f"{v:.{digits}f}" if isinstance(v, float) else str(v)

        def ratio(a: Any, b: Any) -> str:
            if a is None or b is None or not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
                return "-"
            if math.isnan(a) or math.isnan(b) or b == 0:
                return "-"
            return f"{a / b:.2f}x"

        header = ["case", "metric", *self.paths, "gw/direct", "gw/nginx", "target", "met"]
        lines = [header]
        for r in self.rows:
            v = r["values"]
            g = v.get("gateway")
            met = "" if r["met"] is None else ("yes" if r["met"] else "NO")
            lines.append([r["case"], r["metric"], *(fmt(v.get(p), r["digits"]) for p in self.paths),
                          ratio(g, v.get("direct")) if r["ratios"] else "",
                          ratio(g, v.get("nginx")) if r["ratios"] and "nginx" in self.paths else "",
                          r["target"], met])
        widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
        out = []
        for n, line in enumerate(lines):
            cells = [str(c).ljust(widths[i]) if i in (0, 1, len(header) - 2, len(header) - 1)
                     else str(c).rjust(widths[i]) for i, c in enumerate(line)]
            out.append("  ".join(cells).rstrip())
            if n == 0:
                out.append("  ".join("-" * w for w in widths))
        return "\n".join(out)


# --- cases ---------------------------------------------------------------------------------------------------


class Suite:
    def __init__(self, args: argparse.Namespace, servers: dict[str, Server], upstream: Server, work: str) -> None:
        self.args = args
        self.servers = servers
        self.upstream = upstream
        self.work = work
        self.paths = [p for p in PATHS if p in servers]
        self.report = Report(self.paths)

    def port(self, path: str) -> int:
        return self.servers[path].port

    def proxy_cpu(self, path: str) -> float:
        """CPU seconds of the process that relays on this path (the upstream itself for direct)."""
        return self.servers[path].cpu()

    def warm_up(self) -> None:
        """A few requests of every kind on every path (the gateway's first POST also probes /props)."""
        for p in self.paths:
            client = BlockingClient(self.port(p))
            for doc in (None, chat(False), chat(True)):
                for _ in range(20):
                    raw = build_request("GET" if doc is None else "POST",
                                        "/v1/models" if doc is None else "/v1/chat/completions", self.port(p), doc)
                    response, _, _ = client.request(raw)
                    if response.status != 200:
                        raise SystemExit(f"warm-up via {p}: status {response.status}\n{self.servers[p].log_tail()}")
            client.close()

    # 1 and 3 ---------------------------------------------------------------------------------------------------

    def latency(self) -> None:
        args = self.args
        cases = [
            ("1 GET /v1/models", "GET", "/v1/models", None),
            ("1 chat non-stream", "POST", "/v1/chat/completions", chat(False)),
            ("3 chat stream (8 chunks)", "POST", "/v1/chat/completions", chat(True)),
        ]
        streams = {"3 chat stream (8 chunks)"}
        clients = {p: BlockingClient(self.port(p)) for p in self.paths}
        raws = {(name, p): build_request(m, path, self.port(p), doc)
                for name, m, path, doc in cases for p in self.paths}
        for name, *_ in cases:  # warm up
            for p in self.paths:
                for _ in range(30):
                    clients[p].request(raws[name, p])
        results: dict[str, Any] = {}
        for name, *_ in cases:
            stream = name in streams
            rounds: list[dict[str, dict[str, float]]] = []
            steal0, t0 = steal_seconds(), time.monotonic()
            for r in range(args.rounds):
                samples: dict[str, list[tuple[float, float]]] = {p: [] for p in self.paths}
                cpu0 = {p: self.proxy_cpu(p) for p in self.paths}
                up0 = self.upstream.cpu()
                for i in range(args.latency_requests):
                    for p in rotate(self.paths, i + r):
                        response, start, end = clients[p].request(raws[name, p])
                        if response.status != 200 or (stream and not response.done_event):
                            raise SystemExit(f"{name} via {p}: status {response.status}, "
                                             f"done={response.done_event}\n{self.servers[p].log_tail()}")
                        first_at = response.first_data if stream else response.first_body
                        samples[p].append((first_at - start, end - start))
                n = args.latency_requests
                up_cpu = (self.upstream.cpu() - up0) / (n * len(self.paths))
                summary: dict[str, dict[str, float]] = {}
                for p in self.paths:
                    total = [t for _, t in samples[p]]
                    first = [f for f, _ in samples[p]]
                    cpu = (self.proxy_cpu(p) - cpu0[p]) / n if p != "direct" else up_cpu
                    summary[p] = {"p50_ms": statistics.median(total) * 1e3, "p99_ms": pct(total, 0.99) * 1e3,
                                  "ttfb_p50_ms": statistics.median(first) * 1e3,
                                  "ttfb_p99_ms": pct(first, 0.99) * 1e3, "cpu_us": cpu * 1e6}
                rounds.append(summary)
            self._check_steal(name, steal0, time.monotonic() - t0)
            med = {p: {k: median([rd[p][k] for rd in rounds]) for k in rounds[0][p]} for p in self.paths}
            results[name] = {"rounds": rounds, "median": med}
            rep = self.report
            if stream:
                rep.row(name, "first data p50 ms", {p: med[p]["ttfb_p50_ms"] for p in self.paths}, digits=3)
                rep.row(name, "first data p99 ms", {p: med[p]["ttfb_p99_ms"] for p in self.paths}, digits=3)
                added = {p: med[p]["ttfb_p50_ms"] - med["direct"]["ttfb_p50_ms"] for p in self.paths if p != "direct"}
                g = added.get("gateway", math.nan)
                rep.row(name, "added TTFB p50 ms", added, ratios=False, target="<= 1.0", met=g <= 1.0, digits=3)
                rep.row(name, "end p50 ms", {p: med[p]["p50_ms"] for p in self.paths}, digits=3)
            else:
                rep.row(name, "p50 ms", {p: med[p]["p50_ms"] for p in self.paths}, digits=3)
                rep.row(name, "p99 ms", {p: med[p]["p99_ms"] for p in self.paths}, digits=3)
                added = {p: med[p]["p50_ms"] - med["direct"]["p50_ms"] for p in self.paths if p != "direct"}
                g = added.get("gateway", math.nan)
                budget = "chat" in name  # (the budget names the chat; a model list is shown beside it)
                rep.row(name, "added p50 ms", added, ratios=False, target="<= 1.5 (goal 1.0)" if budget else "",
                        met=g <= 1.5 if budget else None, digits=3)
            rep.row(name, "CPU us/request", {p: med[p]["cpu_us"] for p in self.paths}, digits=0)
            key = "ttfb_p50_ms" if stream else "p50_ms"
            if med["gateway"][key] <= med["direct"][key]:
                rep.warn(f"{name}: direct ({med['direct'][key]:.3f} ms) does not beat the gateway "
                         f"({med['gateway'][key]:.3f} ms): the client may be the bottleneck")
        for c in clients.values():
            c.close()
        self.report.raw["latency"] = results

    # 2 ----------------------------------------------------------------------------------------------------------

    def _interleaved(
        self, reps: int, run: Callable[[str, Any], dict[str, float]], arg: Any
    ) -> tuple[dict[str, list[dict[str, float]]], dict[str, dict[str, float]]]:
        """C{run(path, arg)} C{reps} times per path, the order of the paths rotating; the runs and their medians."""
        runs: dict[str, list[dict[str, float]]] = {p: [] for p in self.paths}
        for rep_i in range(reps):
            for p in rotate(self.paths, rep_i):
                runs[p].append(run(p, arg))
        med = {p: {k: median([r[k] for r in runs[p]]) for k in runs[p][0]} for p in self.paths}
        return runs, med

    def fixed_rate(self) -> None:
        args = self.args
        out: dict[str, Any] = {}
        for rate in args.rates:
            runs, med = self._interleaved(args.rate_reps, self._rate_run, rate)
            out[str(rate)] = {"runs": runs, "median": med}
            name = f"2 open loop {rate}/s (chat)"
            rep = self.report
            rep.row(name, "achieved req/s", {p: med[p]["achieved"] for p in self.paths}, digits=1)
            rep.row(name, "p50 ms", {p: med[p]["p50_ms"] for p in self.paths}, digits=3)
            rep.row(name, "p99 ms", {p: med[p]["p99_ms"] for p in self.paths}, digits=3)
            rep.row(name, "server CPU us/request", {p: med[p]["cpu_us"] for p in self.paths}, digits=0)
            rep.row(name, "server CPU % of a core", {p: med[p]["cpu_pct"] for p in self.paths}, digits=0)
            d = med["direct"]
            if d["achieved"] < 0.97 * rate:
                rep.warn(f"{name}: direct achieved {d['achieved']:.0f}/s of {rate}/s: the load generator "
                         "or the upstream is the bottleneck")
            if d["lateness_p99_ms"] > 5:
                rep.warn(f"{name}: the load generator sent late (p99 {d['lateness_p99_ms']:.1f} ms behind schedule) "
                         "on the direct path")
            if med["gateway"]["p50_ms"] <= d["p50_ms"]:
                rep.warn(f"{name}: direct does not beat the gateway: the client may be the bottleneck")
        self.report.raw["fixed_rate"] = out

    def _rate_run(self, path: str, rate: int) -> dict[str, float]:
        args = self.args
        workers = max(1, min(args.workers, rate // 50 or 1))
        port = self.port(path)
        raw = build_request("POST", "/v1/chat/completions", port, chat(False))
        start = time.monotonic() + 0.5
        deadline = start + args.rate_duration + 3.0
        total = round(rate * args.rate_duration)
        configs = [{"port": port, "raw": raw, "rate": rate, "start": start, "first": w, "step": workers,
                    "total": total, "deadline": deadline, "max_conns": 256, "preconnect": 4}
                   for w in range(workers)]
        cpu0, up0, steal0 = self.proxy_cpu(path), self.upstream.cpu(), steal_seconds()
        t0 = time.monotonic()
        results = run_workers("rate", configs, args.rate_duration + 20)
        wall = time.monotonic() - t0
        self._check_steal(f"rate {rate}/s via {path}", steal0, wall)
        cpu, up = self.proxy_cpu(path) - cpu0, self.upstream.cpu() - up0
        self._check_errors(f"rate {rate}/s via {path}", results)
        latencies = [x for r in results for x in r.get("latencies", [])]
        ok = sum(r.get("ok", 0) for r in results)
        sent = sum(r.get("sent", 0) for r in results)
        last = max((r.get("last_finish", math.nan) for r in results), default=math.nan)
        span = max(args.rate_duration, last - start) if not math.isnan(last) else math.nan
        failures = sum(r.get("failures", 0) + r.get("unfinished", 0) for r in results)
        if failures:
            self.report.warn(f"rate {rate}/s via {path}: {failures} of {sent} requests failed or did not finish")
        return {"achieved": ok / span if span else math.nan, "ok": ok, "sent": sent, "failures": failures,
                "p50_ms": median(latencies) * 1e3, "p99_ms": pct(latencies, 0.99) * 1e3,
                "lateness_p99_ms": max(r.get("lateness_p99", math.nan) for r in results) * 1e3,
                "cpu_us": 1e6 * cpu / ok if ok else math.nan, "cpu_pct": 100 * cpu / span,
                "upstream_cpu_pct": 100 * up / span, "wall_s": wall}

    def _check_steal(self, what: str, steal0: float, wall: float) -> float:
        """Warn when the VM lost more than 2% of its CPUs' time to the hypervisor during a run; the share."""
        share = (steal_seconds() - steal0) / (wall * (os.cpu_count() or 1)) if wall > 0 else 0.0
        if share > 0.02:
            self.report.warn(f"{what}: the VM lost {100 * share:.0f}% of its CPU time to steal: a noisy run")
        return share

    def _check_errors(self, what: str, results: list[dict[str, Any]]) -> None:
        busiest = 0.0
        for r in results:
            if "error" in r:
                self.report.warn(f"{what}: a load worker failed: {r['error']}")
            busiest = max(busiest, r.get("client_busy", 0.0))
        if busiest > 0.85:
            self.report.warn(f"{what}: a load worker was on the CPU {100 * busiest:.0f}% of its run: "
                             "the client may limit this run's figures (more --workers, or read them as a floor)")

    # 4 ----------------------------------------------------------------------------------------------------------

    def paced(self) -> None:
        args = self.args
        out: dict[str, Any] = {}
        for streams in args.paced_streams:
            runs, med = self._interleaved(args.paced_reps, self._paced_run, streams)
            out[str(streams)] = {"runs": runs, "median": med}
            rate = streams * 1000 / args.paced_interval_ms
            name = f"4 paced {streams} streams ({rate:,.0f} chunks/s)"
            rep = self.report
            delivered = {p: med[p]["delivered_pct"] for p in self.paths}
            d, g = delivered["direct"], delivered.get("gateway", math.nan)
            gaps = {p: med[p]["gap_p99_ms"] for p in self.paths}
            budget = streams == 400  # (the budget's row; others are shown beside it)
            rep.row(name, "delivered % of offered", delivered, digits=1, target=">= 99" if budget else "",
                    met=g >= 99 if budget else None)
            rep.row(name, "p99 longest gap ms", gaps, digits=1, target="goal <= 2x direct" if budget else "",
                    met=gaps.get("gateway", math.nan) <= 2 * gaps["direct"] if budget else None)
            rep.row(name, "streams unfinished at end", {p: med[p]["unfinished"] for p in self.paths}, digits=0,
                    ratios=False)
            rep.row(name, "server CPU % of a core", {p: med[p]["cpu_pct"] for p in self.paths}, digits=0)
            rep.row(name, "CPU us/chunk", {p: med[p]["cpu_us_per_chunk"] for p in self.paths}, digits=1)
            if d < 98.0:
                rep.warn(f"{name}: direct delivered only {d:.1f}%: the paced upstream or the load generator "
                         "is the bottleneck")
        self.report.raw["paced"] = out

    def _paced_run(self, path: str, streams: int) -> dict[str, float]:
        args = self.args
        workers = max(1, min(args.workers, streams))
        ramp = max(0.3, streams / 400)
        ramp_start = time.monotonic() + 0.5
        window_start = ramp_start + ramp + 1.0
        window_end = window_start + args.paced_duration
        configs = []
        for w in range(workers):
            count = len(range(w, streams, workers))
            configs.append({"port": self.port(path), "streams": count, "interval_ms": args.paced_interval_ms,
                            "ramp_start": ramp_start, "ramp": ramp, "stride": workers / streams,
                            "offset": w / streams, "window_start": window_start, "window_end": window_end,
                            "close_at": window_end + 0.3})
        pool = Workers("paced", configs)
        try:
            steal0 = steal_seconds()
            time.sleep(max(0.0, window_start - time.monotonic()))
            cpu0, up0 = self.proxy_cpu(path), self.upstream.cpu()
            time.sleep(max(0.0, window_end - time.monotonic()))
            cpu, up = self.proxy_cpu(path) - cpu0, self.upstream.cpu() - up0
            self._check_steal(f"paced {streams} via {path}", steal0, window_end - ramp_start + 0.5)
            results = pool.recv_all(20)
        finally:
            pool.join()
        self._check_errors(f"paced {streams} via {path}", results)
        offered = streams * args.paced_duration * 1000 / args.paced_interval_ms
        in_window = sum(r.get("in_window", 0) for r in results)
        gaps = [g for r in results for g in r.get("max_gaps", [])]
        errors = sum(r.get("errors", 0) + r.get("error_events", 0) for r in results)
        completed = sum(r.get("completed", 0) for r in results)
        if errors:
            self.report.warn(f"paced {streams} via {path}: {errors} streams failed")
        if in_window > 1.05 * offered:
            self.report.warn(f"paced {streams} via {path}: {100 * in_window / offered:.0f}% of the offer arrived in "
                             "the window: a stall before it was caught up inside it (a noisy run?)")
        return {"delivered_pct": 100 * in_window / offered, "gap_p99_ms": pct(gaps, 0.99) * 1e3,
                "gap_max_ms": max(gaps) * 1e3 if gaps else math.nan,
                "unfinished": streams - completed, "errors": errors,
                "cpu_pct": 100 * cpu / args.paced_duration,
                "cpu_us_per_chunk": 1e6 * cpu / in_window if in_window else math.nan,
                "upstream_cpu_pct": 100 * up / args.paced_duration}

    # 5 ----------------------------------------------------------------------------------------------------------

    def unpaced(self) -> None:
        args = self.args
        out: dict[str, Any] = {}
        for streams in args.unpaced_streams:
            runs, med = self._interleaved(args.unpaced_reps, self._unpaced_run, streams)
            out[str(streams)] = {"runs": runs, "median": med}
            name = f"5 unpaced {streams} stream{'s' if streams > 1 else ''} x {args.unpaced_chunks // streams:,}"
            rep = self.report
            rep.row(name, "chunks/s", {p: med[p]["chunks_per_s"] for p in self.paths}, digits=0)
            cpu = {p: med[p]["cpu_us_per_chunk"] for p in self.paths}
            budget = streams == 1
            rep.row(name, "CPU us/chunk", cpu, digits=1, target="<= 15" if budget else "",
                    met=cpu.get("gateway", math.nan) <= 15 if budget else None)
            if med["direct"]["chunks_per_s"] <= med["gateway"]["chunks_per_s"]:
                rep.warn(f"{name}: direct is not faster than the gateway: the client or upstream is the bottleneck")
        self.report.raw["unpaced"] = out

    def _unpaced_run(self, path: str, streams: int) -> dict[str, float]:
        args = self.args
        workers = max(1, min(args.workers, streams))
        per_stream = args.unpaced_chunks // streams
        start = time.monotonic() + 0.5
        configs = [{"port": self.port(path), "streams": len(range(w, streams, workers)), "chunks": per_stream,
                    "start": start, "deadline": start + args.unpaced_timeout} for w in range(workers)]
        cpu0, steal0, t0 = self.proxy_cpu(path), steal_seconds(), time.monotonic()
        results = run_workers("unpaced", configs, args.unpaced_timeout + 15)
        cpu = self.proxy_cpu(path) - cpu0
        self._check_steal(f"unpaced {streams} via {path}", steal0, time.monotonic() - t0)
        self._check_errors(f"unpaced via {path}", results)
        done = [s for r in results for s in r.get("streams", [])]
        events = sum(s["events"] for s in done)
        incomplete = sum(1 for s in done if not s["complete"])
        if incomplete:
            self.report.warn(f"unpaced {streams} via {path}: {incomplete} streams incomplete")
        span = max(s["end"] for s in done) - min(s["start"] for s in done) if done else math.nan
        return {"chunks_per_s": events / span if span else math.nan, "events": events,
                "cpu_us_per_chunk": 1e6 * cpu / events if events else math.nan, "seconds": span}

    # 6 ----------------------------------------------------------------------------------------------------------

    def held(self) -> None:
        args = self.args
        n = args.held_clients
        gw = start_gateway(self.work, "gateway-held", self.upstream.port, 1, n + 100)
        rep = self.report
        result: dict[str, Any] = {"clients": n, "order": args.held_order, "waves": []}
        try:
            holder = socket.create_connection(("127.0.0.1", gw.port))
            holder.sendall(build_request("POST", "/v1/chat/completions", gw.port, chat(True, 8, bench_hold=True)))
            parser = loadgen.ResponseParser()
            holder.settimeout(10)
            while not parser.data_events:
                data = holder.recv(65536)
                if not data:
                    raise SystemExit("the holding stream closed")
                parser.feed(data, time.monotonic())
            time.sleep(0.5)
            result["rss_before_kb"] = gw.rss_kb()
            result["health_idle"] = self._health(gw.port, args.health_polls, 4.0)  # spread too: same wake-ups
            for wave in range(args.held_waves):
                log(f"  wave {wave + 1}: {n} clients")
                outcome = self._held_wave(gw, n, first=wave == 0)
                result["waves"].append(outcome)
                if not outcome["drained"]:
                    break
            holder.close()
        finally:
            gw.stop()
        rep.raw["held"] = result
        before = result["rss_before_kb"]
        first = result["waves"][0]
        queued = first["queued"]
        per_client = (first["rss_while_kb"] - before) / queued if queued else math.nan
        result["per_client_kb"] = per_client
        name = f"6 {n:,} waiting streams (gateway)"

        def gv(value: float) -> dict[str, float]:
            return {"gateway": value}

        rep.row(name, "clients queued", gv(queued), ratios=False, digits=0)
        if first["refused"] or first["failed"]:
            rep.row(name, "clients refused / failed", gv(first["refused"] + first["failed"]), ratios=False, digits=0)
        rep.row(name, "seconds to queue all", gv(first["queue_seconds"]), ratios=False, digits=1)
        rep.row(name, "RSS before MB", gv(before / 1024), ratios=False, digits=1)
        rep.row(name, "RSS while waiting MB", gv(first["rss_while_kb"] / 1024), ratios=False, digits=1)
        rep.row(name, "KB per waiting client", gv(per_client), ratios=False, digits=1, target="<= 16",
                met=per_client <= 16)
        rep.row(name, "/health p50 ms idle", gv(result["health_idle"]["p50_ms"]), ratios=False, digits=3)
        health = first["health_while"]
        rep.row(name, "/health p50 ms waiting", gv(health["p50_ms"]), ratios=False, digits=3)
        rep.row(name, "/health max ms waiting", gv(health["max_ms"]), ratios=False, digits=3)
        rep.row(name, "/health p99 ms waiting", gv(health["p99_ms"]), ratios=False, digits=3,
                target="< 5", met=health["p99_ms"] < 5)
        rep.row(name, "queue comments received", gv(first["comments_received"]), ratios=False, digits=0)
        rep.row(name, f"seconds to empty queue ({args.held_order})", gv(first["drain_seconds"]), ratios=False,
                digits=1, target=f"(limit {args.drain_timeout:.0f})")
        rep.row(name, "longest /metrics probe while leaving ms", gv(first["drain_probe_ms_max"]), ratios=False,
                digits=0, target="(probe timeout 30 s)")
        rep.row(name, "RSS peak while leaving MB", gv(first["rss_peak_kb"] / 1024), ratios=False, digits=1)
        rep.row(name, "RSS after they left MB", gv(first["rss_after_kb"] / 1024), ratios=False, digits=1)
        for i, wave in enumerate(result["waves"][1:], start=2):
            rep.row(name, f"wave {i}: RSS waiting / after MB",
                    {"gateway": f"{wave['rss_while_kb'] / 1024:.1f} / {wave['rss_after_kb'] / 1024:.1f}"},
                    ratios=False)
        if queued < n:
            rep.warn(f"held clients: only {queued} of {n} got queued "
                     f"({first['refused']} refused, {first['failed']} failed)")
        if not first["drained"]:
            rep.warn(f"held clients: the gateway's queue was not empty {first['drain_seconds_waited']:.0f} s "
                     f"after {n} clients left ({first['drain_stop']})")

    def _held_wave(self, gw: Server, n: int, first: bool) -> dict[str, Any]:
        args = self.args
        cpu0 = gw.cpu()
        t0 = time.monotonic()
        workers = max(1, min(args.workers * 2, n // 250 or 1))
        configs = [{"port": gw.port, "count": len(range(w, n, workers)), "concurrency": 64,
                    "order": args.held_order} for w in range(workers)]
        pool = Workers("held", configs)
        try:
            holding = pool.recv_all(args.held_timeout)
            queue_seconds = time.monotonic() - t0
            queue_cpu = gw.cpu() - cpu0
            self._check_errors("held clients", holding)
            queued = sum(h.get("queued", 0) for h in holding)
            refused = sum(h.get("refused", 0) for h in holding)
            failed = sum(h.get("failed", 0) for h in holding)
            log(f"  {queued} queued, {refused} refused, {failed} failed in {queue_seconds:.1f} s")
            time.sleep(1.0)
            waiting = self._queue_waiting(gw.port)
            rss_while = gw.rss_kb()
            # the first wave's polls span a keepalive round (a comment to every waiter each 15 s)
            health_while = self._health(gw.port, args.health_polls, args.health_seconds) if first else {}
            rss_while = max(rss_while, gw.rss_kb())
            cpu1 = gw.cpu()
            pool.send_all("close")
            t_close = time.monotonic()
            drained, probes, peak, stop = self._drain(gw, t_close + args.drain_timeout)
            waited = time.monotonic() - t_close
            drain_cpu = gw.cpu() - cpu1
            closed = pool.recv_all(30)
        finally:
            pool.join()
        log(f"  queue {'empty' if drained else 'NOT empty'} after {waited:.1f} s")
        time.sleep(1.0)
        return {"queued": queued, "refused": refused, "failed": failed, "gateway_waiting": waiting,
                "queue_seconds": queue_seconds, "queue_cpu_s": queue_cpu, "rss_while_kb": rss_while,
                "health_while": health_while, "drained": drained, "drain_stop": stop,
                "drain_seconds": waited if drained else math.nan, "drain_seconds_waited": waited,
                "drain_cpu_s": drain_cpu, "drain_probe_ms_max": max(probes, default=0.0), "rss_peak_kb": peak,
                "rss_after_kb": gw.rss_kb() if gw.proc.poll() is None else math.nan,
                "comments_received": sum(c.get("comments_received", 0) for c in closed)}

    def _health(self, port: int, polls: int, spread: float = 0.0) -> dict[str, float]:
        """C{polls} sequential GET /health on one connection, evenly over C{spread} seconds."""
        client = BlockingClient(port, timeout=60)
        raw = build_request("GET", "/health", port)
        times = []
        begin = time.monotonic()
        for i in range(polls):
            time.sleep(max(0.0, begin + spread * i / polls - time.monotonic()))
            _, start, end = client.request(raw)
            times.append(end - start)
        client.close()
        return {"p50_ms": median(times) * 1e3, "p99_ms": pct(times, 0.99) * 1e3, "max_ms": max(times) * 1e3}

    def _queue_waiting(self, port: int, timeout: float = 60.0) -> Optional[int]:
        """The gateway's queue length from GET /metrics (loopback clients may read it), or None."""
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
                s.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                chunks = []
                while True:
                    data = s.recv(65536)
                    if not data:
                        break
                    chunks.append(data)
            head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
            if b"transfer-encoding: chunked" in head.lower():
                body = _dechunk(body)
            return int(json.loads(body)["queue"]["waiting"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _drain(self, gw: Server, deadline: float) -> tuple[bool, list[float], int, str]:
        """
        Poll until the gateway's queue is empty, the deadline passes or its RSS
        passes the cap: (emptied, the probes' times in ms, peak RSS, why it stopped).
        """
        probes = []
        peak = gw.rss_kb()
        cap = self.args.max_gateway_rss_mb * 1024
        while time.monotonic() < deadline:
            t = time.monotonic()
            waiting = self._queue_waiting(gw.port, timeout=max(1.0, min(30.0, deadline - t)))
            probes.append((time.monotonic() - t) * 1e3)
            peak = max(peak, gw.rss_kb())
            if waiting == 0:
                return True, probes, peak, "empty"
            if peak > cap:
                return False, probes, peak, f"RSS over {self.args.max_gateway_rss_mb} MB"
            time.sleep(0.2)
        return False, probes, peak, "timeout"


def _dechunk(body: bytes) -> bytes:
    out, pos = [], 0
    while True:
        eol = body.find(b"\r\n", pos)
        if eol < 0:
            break
        size = int(body[pos:eol].split(b";")[0], 16)
        if not size:
            break
        out.append(body[eol + 2:eol + 2 + size])
        pos = eol + 2 + size + 2
    return b"".join(out)


TARGETS = """The budget (bench/README.md):
  chat non-stream, 1 connection, added p50 <= 1.5 ms (goal 1.0); stream time to first byte, added p50 <= 1.0 ms;
  CPU per relayed chunk (unpaced, 1 stream) <= 15 us;
  400 paced streams, 20 ms apart: >= 99% delivered, p99 longest gap beside direct's (goal <= 2x);
  10,000 streams waiting in the queue: <= 16 KB each, /health p99 < 5 ms.
  (The real llama-server row is bench/llama.py's.)"""


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    def ints(text: str) -> list[int]:
        return [int(x) for x in text.split(",") if x]

    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 1-2 minute smoke run (smaller counts, 1 repetition)")
    parser.add_argument("--json", metavar="PATH", help="write the table, targets and raw numbers here")
    parser.add_argument("--skip-nginx", action="store_true", help="leave nginx out even when it is installed")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (servers' logs)")
    parser.add_argument("--cases", type=ints, default=[1, 2, 3, 4, 5, 6], help="which cases (1 and 3 run together)")
    parser.add_argument("--workers", type=int, default=3, help="load generator processes")
    parser.add_argument("--rounds", type=int, default=3, help="latency rounds (median of their p50/p99)")
    parser.add_argument("--latency-requests", type=int, help="requests per path, case and round [500; quick 150]")
    parser.add_argument("--rates", type=ints, default=[200, 500], help="open-loop rates, req/s")
    parser.add_argument("--rate-duration", type=float, help="seconds per rate run [5; quick 2]")
    parser.add_argument("--rate-reps", type=int, help="runs per rate and path [3; quick 1]")
    parser.add_argument("--paced-streams", type=ints, default=[100, 400])
    parser.add_argument("--paced-interval-ms", type=float, default=20.0)
    parser.add_argument("--paced-duration", type=float, help="measured window, seconds [8; quick 3]")
    parser.add_argument("--paced-reps", type=int, help="[3; quick 1]")
    parser.add_argument("--unpaced-streams", type=ints, default=[1, 4])
    parser.add_argument("--unpaced-chunks", type=int,
                        help="chunks per run, split over the streams [300000; quick 100000]")
    parser.add_argument("--unpaced-reps", type=int, help="[3; quick 1]")
    parser.add_argument("--unpaced-timeout", type=float, default=60.0)
    parser.add_argument("--held-clients", type=int, help="streaming clients waiting in the queue [10000; quick 1000]")
    parser.add_argument("--held-order", choices=["fifo", "lifo", "random"], default="fifo",
                        help="the order the waiting clients leave in (fifo: the first queued first)")
    parser.add_argument("--held-timeout", type=float, default=180.0, help="seconds allowed to queue them all")
    parser.add_argument("--held-waves", type=int, default=2,
                        help="waves of held clients (a second one tells a leak from the allocator's high water)")
    parser.add_argument("--max-gateway-rss-mb", type=int, default=6144,
                        help="stop waiting for the queue to empty when the gateway's RSS passes this")
    parser.add_argument("--health-polls", type=int, default=200)
    parser.add_argument("--health-seconds", type=float, default=16.0,
                        help="spread the polls while clients wait over this long (past one 15 s keepalive round)")
    parser.add_argument("--drain-timeout", type=float, help="seconds allowed for the queue to empty [120; quick 60]")
    args = parser.parse_args(argv)
    full = {"latency_requests": 500, "rate_duration": 5.0, "rate_reps": 3, "paced_duration": 8.0, "paced_reps": 3,
            "unpaced_chunks": 300_000, "unpaced_reps": 3, "held_clients": 10_000, "drain_timeout": 120.0}
    quick = {"latency_requests": 150, "rate_duration": 2.0, "rate_reps": 1, "paced_duration": 3.0, "paced_reps": 1,
             "unpaced_chunks": 100_000, "unpaced_reps": 1, "held_clients": 1000, "drain_timeout": 60.0}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    nofile = raise_nofile()
    if 6 in args.cases and nofile < args.held_clients + 1000:
        log(f"WARNING: open-file limit {nofile} is low for {args.held_clients} held clients")
    work = work_folder("suite", loadgen.KEY)
    started = time.time()
    git = git_info()  # the code the gateway loads now (files may change during the run)
    servers: dict[str, Server] = {}
    stopping: list[Server] = []
    log(f"work folder {work}")
    try:
        upstream = start_upstream(work)
        stopping.append(upstream)
        servers["direct"] = upstream
        if not args.skip_nginx:
            nginx = start_nginx(work, upstream.port)
            if nginx is None:
                log("nginx is not installed: its column stays empty (apt-get install nginx-light)")
            else:
                stopping.append(nginx)
                servers["nginx"] = nginx
        gateway = start_gateway(work, "gateway", upstream.port, 1000, 20000)
        stopping.append(gateway)
        servers["gateway"] = gateway
        suite = Suite(args, servers, upstream, work)
        suite.warm_up()
        steps: list[tuple[int, str, Callable[[], None]]] = [
            (1, "1+3 latency on one connection", suite.latency),
            (2, "2 open-loop fixed rate", suite.fixed_rate),
            (4, "4 paced streams", suite.paced),
            (5, "5 unpaced chunk throughput", suite.unpaced),
            (6, "6 held waiting clients", suite.held),
        ]
        for number, title, step in steps:
            if number in args.cases or (number == 1 and 3 in args.cases):
                log(f"case {title}")
                t = time.monotonic()
                step()
                log(f"  done in {time.monotonic() - t:.0f} s")
        for server in (gateway, *([servers["nginx"]] if "nginx" in servers else [])):
            if server.proc.poll() is not None:
                suite.report.warn(f"{server.name} exited during the run:\n{server.log_tail()}")
        with open(gateway.logfile, errors="replace") as f:
            tracebacks = sum(1 for line in f if "Traceback" in line)
        if tracebacks:
            suite.report.warn(f"the gateway's log has {tracebacks} tracebacks ({gateway.logfile})")
    finally:
        for server in reversed(stopping):
            server.stop()
    rep = suite.report
    info = {"python": platform.python_version(), "python_executable": os.path.realpath(sys.executable),
            "python_build": " ".join(platform.python_build()), "cpus": os.cpu_count(), "machine": platform.machine(),
            "nginx": nginx_version() if "nginx" in servers else None, "git": git,
            "quick": args.quick, "seconds": round(time.time() - started, 1), "workers": args.workers}
    dirty = f" (+{len(info['git']['dirty_files'])} changed files in twisted_gw)" if info["git"]["dirty_files"] else ""
    print(f"llmgw suite: commit {info['git']['commit']}{dirty}, Python {info['python']} "
          f"({info['python_executable']}), {info['cpus']} CPUs, "
          f"nginx {info['nginx'] or '-'} (1 worker), {'quick' if args.quick else 'full'} run "
          f"in {info['seconds']:.0f} s")
    print()
    print(rep.table())
    print("(direct CPU columns are the upstream's own CPU; nginx's and the gateway's are theirs alone)")
    print()
    print(TARGETS)
    if rep.warnings:
        print()
        for w in rep.warnings:
            print("WARNING:", w)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "args": vars(args), "rows": rep.rows, "warnings": rep.warnings,
                       "raw": rep.raw}, f, indent=2, default=str)
        print(f"\nwritten {args.json}")
    if args.keep:
        print(f"logs kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
