"""
The benchmark suite's load generator: a small incremental HTTP/1.1 response
parser that counts SSE events as they arrive, a blocking keep-alive client for
one-connection latency, and asyncio workers run in several forked processes
(open-loop fixed rate, paced streams, unpaced streams, held waiting streams).

Times are C{time.monotonic()} everywhere (asyncio's loop clock is the same
system-wide CLOCK_MONOTONIC), so the orchestrator can give every worker the
same start and end of a measurement window.
"""

from __future__ import annotations

import asyncio
import gc
import json
import math
import multiprocessing
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, Optional

KEY = "sk-bench"

_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILER, _UNTIL_CLOSE, _DONE = range(8)


def build_request(method: str, path: str, port: int, doc: Optional[dict[str, Any]] = None) -> bytes:
    """The raw bytes of one keep-alive request (same headers on every path)."""
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {KEY}\r\n"
    if doc is None:
        return (head + "\r\n").encode()
    body = json.dumps(doc).encode()
    return (head + f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


def chat(stream: bool, tokens: int = 8, **knobs: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": tokens}
    if stream:
        doc["stream"] = True
    doc.update(knobs)
    return doc


class ResponseParser:
    """One HTTP/1.1 response, fed as it arrives; counts SSE C{data:} events and comments."""

    __slots__ = ("buf", "comments", "complete", "data_events", "done_event", "error_events", "event_stream",
                 "first_body", "first_data", "keep_alive", "left", "sse_tail", "state", "status")

    def __init__(self) -> None:
        self.buf = b""
        self.state = _HEAD
        self.status = 0
        self.event_stream = False
        self.keep_alive = True
        self.left = 0
        self.first_body = 0.0
        self.first_data = 0.0
        self.data_events = 0
        self.error_events = 0
        self.comments = 0
        self.done_event = False
        self.complete = False
        self.sse_tail = b""

    def feed(self, data: bytes, now: float) -> int:
        """Parse C{data}, received at C{now}; the number of new data events it completed."""
        before = self.data_events
        buf = self.buf + data if self.buf else data
        pos, size = 0, len(buf)
        while pos < size or self.state == _DONE:
            state = self.state
            if state == _HEAD:
                end = buf.find(b"\r\n\r\n", pos)
                if end < 0:
                    break
                self._head(buf[pos:end])
                pos = end + 4
            elif state == _LENGTH or state == _CHUNK_DATA:
                take = min(self.left, size - pos)
                self._body(buf[pos:pos + take], now)
                pos += take
                self.left -= take
                if not self.left:
                    self.state = _CHUNK_END if state == _CHUNK_DATA else _DONE
            elif state == _CHUNK_SIZE:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                length = int(buf[pos:eol].split(b";", 1)[0], 16)
                pos = eol + 2
                self.left = length
                self.state = _CHUNK_DATA if length else _TRAILER
            elif state == _CHUNK_END:
                if size - pos < 2:
                    break
                pos += 2
                self.state = _CHUNK_SIZE
            elif state == _TRAILER:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                self.state = _DONE if eol == pos else _TRAILER
                pos = eol + 2
            elif state == _UNTIL_CLOSE:
                self._body(buf[pos:], now)
                pos = size
            else:  # _DONE
                self.complete = True
                break
        self.buf = buf[pos:]
        return self.data_events - before

    def closed(self) -> None:
        """The connection closed: complete if the body ran until the close."""
        if self.state == _UNTIL_CLOSE:
            self.state = _DONE
            self.complete = True

    def _head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        self.status = int(lines[0].split(b" ", 2)[1])
        length: Optional[int] = None
        chunked = False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            value = value.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value
            elif name == b"content-type":
                self.event_stream = value.startswith(b"text/event-stream")
            elif name == b"connection":
                self.keep_alive = b"close" not in value
        if 100 <= self.status < 200:
            return  # an interim response: the real one follows
        if chunked:
            self.state = _CHUNK_SIZE
        elif length is not None:
            self.left = length
            self.state = _LENGTH if length else _DONE
        elif self.status in (204, 304):
            self.state = _DONE
        else:
            self.state = _UNTIL_CLOSE
            self.keep_alive = False

    def _body(self, piece: bytes, now: float) -> None:
        if not piece:
            return
        if not self.first_body:
            self.first_body = now
        if not self.event_stream:
            return
        text = self.sse_tail + piece if self.sse_tail else piece
        if b"\n\n" not in text:
            self.sse_tail = text
            return
        events = text.split(b"\n\n")
        self.sse_tail = events.pop()
        for event in events:
            if event.startswith(b"data:"):
                if event.startswith(b"data: [DONE]"):
                    self.done_event = True
                else:
                    self.data_events += 1
                    if event.startswith(b'data: {"error"'):
                        self.error_events += 1
            elif event.startswith(b":"):
                self.comments += 1
        if self.data_events and not self.first_data:
            self.first_data = now


class BlockingClient:
    """One keep-alive connection, one request at a time: for latency with the least client overhead."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.port = port
        self.timeout = timeout
        self.sock: Optional[socket.socket] = None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def request(self, raw: bytes) -> tuple[ResponseParser, float, float]:
        """(the parsed response, start, end); retried once on a fresh connection if a reused one was closed."""
        for attempt in (0, 1):
            reused = self.sock is not None
            if self.sock is None:
                self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout)
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            parser = ResponseParser()
            start = time.monotonic()
            try:
                self.sock.sendall(raw)
                while not parser.complete:
                    data = self.sock.recv(262144)
                    now = time.monotonic()
                    if not data:
                        parser.closed()
                        if parser.complete:
                            break
                        raise ConnectionResetError("closed mid-response")
                    parser.feed(data, now)
            except (ConnectionError, BrokenPipeError):
                self.close()
                if reused and attempt == 0 and not parser.status:
                    continue
                raise
            if not parser.keep_alive:
                self.close()
            return parser, start, now
        raise AssertionError("unreachable")


class NotOK(Exception):
    """A warm-up request through target C{index} did not answer 200."""

    def __init__(self, index: int) -> None:
        super().__init__(f"target {index}: not 200")
        self.index = index


def interleaved(ports: list[int], method: str, path: str, doc: Optional[dict[str, Any]], blocks: int, block: int,
                cpu: Optional[list[Callable[[], float]]] = None,
                ) -> tuple[list[list[float]], list[list[float]], list[float]]:
    """
    One keep-alive connection per port; 100 warm-up requests each (L{NotOK} unless all answer 200), then C{blocks}
    rounds in which each port in turn gets C{block} requests, the order reversed every other round, so a slow
    moment of the machine falls on all. Each port's request times, times to the first byte (the first data event
    for a stream) and, given C{cpu} (a CPU-seconds reading per port), the CPU its blocks took.
    """
    stream = bool(doc is not None and doc.get("stream"))
    clients = [BlockingClient(port) for port in ports]
    raws = [build_request(method, path, port, doc) for port in ports]
    times: list[list[float]] = [[] for _ in ports]
    firsts: list[list[float]] = [[] for _ in ports]
    spent = [0.0 for _ in ports]
    for i, client in enumerate(clients):
        for _ in range(100):
            if client.request(raws[i])[0].status != 200:
                raise NotOK(i)
    order = list(range(len(ports)))
    for round_ in range(blocks):
        for i in (order if round_ % 2 == 0 else order[::-1]):
            c0 = cpu[i]() if cpu else 0.0
            for _ in range(block):
                response, start_at, end_at = clients[i].request(raws[i])
                times[i].append(end_at - start_at)
                firsts[i].append((response.first_data if stream else response.first_body) - start_at)
            if cpu:
                spent[i] += cpu[i]() - c0
    for client in clients:
        client.close()
    return times, firsts, spent


# --- asyncio workers -------------------------------------------------------------------------------------------


class _Conn(asyncio.Protocol):
    """One client connection of a worker; one request at a time."""

    def __init__(self, on_lost: Optional[Callable[[_Conn], None]] = None) -> None:
        self.transport: Optional[asyncio.Transport] = None
        self.parser: Optional[ResponseParser] = None
        self.on_data: Optional[Callable[[_Conn, int, float], None]] = None
        self.on_done: Optional[Callable[[_Conn, bool, float], None]] = None
        self.on_lost = on_lost
        self.open = False
        self.tag: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.open = True

    def send(self, raw: bytes, on_data: Optional[Callable[[_Conn, int, float], None]],
             on_done: Optional[Callable[[_Conn, bool, float], None]]) -> None:
        self.parser = ResponseParser()
        self.on_data = on_data
        self.on_done = on_done
        assert self.transport is not None
        self.transport.write(raw)

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        if parser is None:
            return
        now = time.monotonic()
        new = parser.feed(data, now)
        if self.on_data is not None:
            self.on_data(self, new, now)
        if parser.complete:
            self._finish(True, now)

    def _finish(self, ok: bool, now: float) -> None:
        done, self.on_done, self.on_data = self.on_done, None, None
        if done is not None:
            done(self, ok, now)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.open = False
        now = time.monotonic()
        if self.parser is not None and not self.parser.complete:
            self.parser.closed()
            self._finish(self.parser.complete, now)
        if self.on_lost is not None:
            self.on_lost(self)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def _connect(port: int, on_lost: Optional[Callable[[_Conn], None]] = None) -> _Conn:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(lambda: _Conn(on_lost), "127.0.0.1", port)
    return conn


async def _sleep_until(when: float) -> None:
    delay = when - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


def pct(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of C{values}; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


async def rate_worker(cfg: dict[str, Any]) -> dict[str, Any]:
    """
    Open loop: request i of the run is due at C{start + i / rate} (this worker
    sends every C{step}-th from C{first}), sent on an idle
    keep-alive connection (or a new one, up to C{max_conns}; beyond, it waits
    for one).  Latency counts from when it was due, so a server that falls
    behind is charged for the wait (no coordinated omission).
    """
    loop = asyncio.get_running_loop()
    port, raw, rate = cfg["port"], cfg["raw"], cfg["rate"]
    start, deadline = cfg["start"], cfg["deadline"]
    mine = range(cfg["first"], cfg["total"], cfg["step"])  # this worker's share of the global schedule
    total = len(mine)
    idle: list[_Conn] = []
    backlog: deque[float] = deque()
    opened = [0]
    latencies: list[float] = []
    lateness: list[float] = []
    finished: list[float] = []
    failures = [0]
    statuses: dict[int, int] = {}
    all_done = loop.create_future()
    tasks: set[asyncio.Task[None]] = set()

    def spawn(due: float) -> None:
        task = loop.create_task(fresh(due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    outstanding = [total]

    def settle() -> None:
        outstanding[0] -= 1
        if not outstanding[0] and not all_done.done():
            all_done.set_result(None)

    def done(conn: _Conn, ok: bool, now: float) -> None:
        due = conn.tag
        parser = conn.parser
        assert parser is not None
        if ok and parser.status:
            statuses[parser.status] = statuses.get(parser.status, 0) + 1
        if ok and parser.status == 200:
            latencies.append(now - due)
            finished.append(now)
        else:
            failures[0] += 1
        settle()
        if conn.open and parser.keep_alive and ok:
            release(conn)
        else:
            conn.close()
            opened[0] -= 1
            if backlog:
                opened[0] += 1
                spawn(backlog.popleft())

    def release(conn: _Conn) -> None:
        if backlog:
            go(conn, backlog.popleft())
        else:
            idle.append(conn)

    def go(conn: _Conn, due: float) -> None:
        conn.tag = due
        lateness.append(time.monotonic() - due)
        conn.send(raw, None, done)

    async def fresh(due: float) -> None:
        try:
            conn = await _connect(port)
        except OSError:
            opened[0] -= 1
            failures[0] += 1
            settle()
            return
        go(conn, due)

    def fire(due: float) -> None:
        if idle:
            go(idle.pop(), due)
        elif opened[0] < cfg["max_conns"]:
            opened[0] += 1
            spawn(due)
        else:
            backlog.append(due)

    for _ in range(min(cfg["preconnect"], cfg["max_conns"])):
        idle.append(await _connect(port))
        opened[0] += 1
    for i in mine:
        due = start + i / rate
        loop.call_at(due, fire, due)
    try:
        await asyncio.wait_for(all_done, max(0.1, deadline - time.monotonic()))
    except asyncio.TimeoutError:
        pass
    return {"sent": total, "ok": len(latencies), "failures": failures[0], "statuses": statuses,
            "unfinished": outstanding[0], "latencies": latencies, "lateness_p99": pct(lateness, 0.99),
            "last_finish": max(finished) if finished else math.nan}


async def paced_worker(cfg: dict[str, Any]) -> dict[str, Any]:
    """
    C{streams} paced streams started evenly over the ramp; counts the data events
    that arrive inside [window_start, window_end] and each stream's longest gap
    between arrivals there (the window's edges count as arrivals).
    """
    port, interval = cfg["port"], cfg["interval_ms"] / 1000.0
    window_start, window_end = cfg["window_start"], cfg["window_end"]
    conns: list[_Conn] = []
    state: list[list[float]] = []  # per stream: [in-window events, last arrival, longest gap, total events]
    errors = [0]

    def on_data(conn: _Conn, new: int, now: float) -> None:
        st = state[conn.tag]
        st[3] += new
        if new and window_start <= now <= window_end:
            st[0] += new
            gap = now - st[1]
            if gap > st[2]:
                st[2] = gap
            st[1] = now

    def on_done(conn: _Conn, ok: bool, now: float) -> None:
        if not ok or conn.parser is None or conn.parser.status != 200:
            errors[0] += 1

    async def one(index: int, when: float) -> None:
        await _sleep_until(when)
        tag = len(state)  # taken now: other streams append theirs while this one connects
        state.append([0, window_start, 0.0, 0])
        try:
            conn = await _connect(port)
        except OSError:
            errors[0] += 1
            return
        conn.tag = tag
        conns.append(conn)
        tokens = math.ceil((window_end - time.monotonic()) / interval) + 2
        conn.send(build_request("POST", "/v1/chat/completions", port,
                                chat(True, tokens, bench_interval_ms=cfg["interval_ms"])), on_data, on_done)

    count = cfg["streams"]
    await asyncio.gather(*(one(i, cfg["ramp_start"] + cfg["ramp"] * (i * cfg["stride"] + cfg["offset"]))
                           for i in range(count)))
    await _sleep_until(cfg["close_at"])
    gaps = []
    in_window = 0
    for st in state:
        gaps.append(max(st[2], window_end - st[1]))
        in_window += int(st[0])
    completed = sum(1 for c in conns if c.parser is not None and c.parser.done_event)
    status_ok = sum(1 for c in conns if c.parser is not None and c.parser.status == 200)
    error_events = sum(c.parser.error_events for c in conns if c.parser is not None)
    failed = errors[0]
    for conn in conns:
        conn.close()
    await asyncio.sleep(0.05)
    return {"streams": len(state), "status_ok": status_ok, "completed": completed, "errors": failed,
            "error_events": error_events, "in_window": in_window, "max_gaps": gaps,
            "total_events": int(sum(st[3] for st in state))}


async def unpaced_worker(cfg: dict[str, Any]) -> dict[str, Any]:
    """C{streams} streams of C{chunks} chunks each, as fast as they come."""
    port = cfg["port"]
    raw = build_request("POST", "/v1/chat/completions", port, chat(True, cfg["chunks"]))
    loop = asyncio.get_running_loop()
    results: list[tuple[float, float, int, bool]] = []

    async def one() -> None:
        conn = await _connect(port)
        finished: asyncio.Future[None] = loop.create_future()

        def on_done(c: _Conn, ok: bool, now: float) -> None:
            assert c.parser is not None
            results.append((c.tag, now, c.parser.data_events, ok and c.parser.done_event))
            finished.set_result(None)

        await _sleep_until(cfg["start"])
        conn.tag = time.monotonic()
        conn.send(raw, None, on_done)
        try:
            await asyncio.wait_for(finished, max(0.1, cfg["deadline"] - time.monotonic()))
        except asyncio.TimeoutError:
            assert conn.parser is not None
            results.append((conn.tag, time.monotonic(), conn.parser.data_events, False))
        conn.close()

    await asyncio.gather(*(one() for _ in range(cfg["streams"])))
    return {"streams": [{"start": s, "end": e, "events": n, "complete": c} for s, e, n, c in results]}


async def held_worker(cfg: dict[str, Any], ctrl: Connection) -> dict[str, Any]:
    """
    Open C{count} streaming requests (at most C{concurrency} connecting at once)
    that wait in the gateway's queue; tell the orchestrator, hold them until it
    says C{close}, then close them all in C{order} and report.
    """
    loop = asyncio.get_running_loop()
    port = cfg["port"]
    raw = build_request("POST", "/v1/chat/completions", port, chat(True, 8))
    conns: list[_Conn] = []
    outcome = {"queued": 0, "refused": 0, "failed": 0, "comments": 0}
    gate = asyncio.Semaphore(cfg["concurrency"])

    async def one() -> None:
        async with gate:
            try:
                conn = await _connect(port)
            except OSError:
                outcome["failed"] += 1
                return
            answered: asyncio.Future[None] = loop.create_future()

            def on_data(c: _Conn, new: int, now: float) -> None:
                if c.parser is not None and (c.parser.comments or c.parser.complete) and not answered.done():
                    answered.set_result(None)

            def on_done(c: _Conn, ok: bool, now: float) -> None:
                if not answered.done():
                    answered.set_result(None)

            conn.send(raw, on_data, on_done)
            conns.append(conn)
            try:
                await asyncio.wait_for(answered, 30)
            except asyncio.TimeoutError:
                pass
            parser = conn.parser
            assert parser is not None
            if parser.status == 200 and parser.comments and not parser.complete:
                outcome["queued"] += 1
            elif parser.status:
                outcome["refused"] += 1
            else:
                outcome["failed"] += 1

    await asyncio.gather(*(one() for _ in range(cfg["count"])))
    ctrl.send({"phase": "holding", **outcome})
    command: asyncio.Future[Any] = loop.create_future()

    def on_command() -> None:
        if not command.done():
            command.set_result(ctrl.recv())

    loop.add_reader(ctrl.fileno(), on_command)
    await command
    loop.remove_reader(ctrl.fileno())
    ordered = list(conns)
    if cfg["order"] == "lifo":
        ordered.reverse()
    elif cfg["order"] == "random":
        import random

        random.Random(1).shuffle(ordered)
    comments = sum(c.parser.comments for c in conns if c.parser is not None)
    still_open = sum(1 for c in conns if c.open)
    closed_at = time.monotonic()
    for conn in ordered:
        conn.close()
    await asyncio.sleep(0.2)
    return {"phase": "closed", **outcome, "comments_received": comments, "open_before_close": still_open,
            "closed_at": closed_at}


# --- running workers in processes ----------------------------------------------------------------------------


def _child(kind: str, cfg: dict[str, Any], conn: Connection) -> None:
    gc.disable()
    started = time.monotonic()
    try:
        if kind == "held":
            result = asyncio.run(held_worker(cfg, conn))
        else:
            worker = {"rate": rate_worker, "paced": paced_worker, "unpaced": unpaced_worker}[kind]
            result = asyncio.run(worker(cfg))
    except BaseException as e:  # reported to the orchestrator, which decides
        result = {"error": f"{type(e).__name__}: {e}"}
    if kind != "held":
        # the share of its active time this worker spent on the CPU (waiting for the start excluded)
        usage = os.times()
        active = time.monotonic() - max(started, cfg.get("start", cfg.get("ramp_start", started)))
        result["client_busy"] = (usage.user + usage.system) / active if active > 0 else 0.0
    conn.send(result)
    conn.close()
    os._exit(0)


class Workers:
    """Forked worker processes, each running one asyncio worker; results come back over pipes."""

    def __init__(self, kind: str, configs: list[dict[str, Any]]) -> None:
        ctx = multiprocessing.get_context("fork")
        self.pipes: list[Connection] = []
        self.procs: list[Any] = []
        for cfg in configs:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_child, args=(kind, cfg, child), daemon=True)
            proc.start()
            child.close()
            self.pipes.append(parent)
            self.procs.append(proc)

    def recv_all(self, timeout: float) -> list[dict[str, Any]]:
        """One message from each worker (an error dict if one does not answer in time)."""
        results: list[dict[str, Any]] = []
        end = time.monotonic() + timeout
        for pipe in self.pipes:
            try:
                if pipe.poll(max(0.0, end - time.monotonic())):
                    results.append(pipe.recv())
                else:
                    results.append({"error": "worker did not answer in time"})
            except EOFError:
                results.append({"error": "worker died"})
        return results

    def send_all(self, message: Any) -> None:
        for pipe in self.pipes:
            pipe.send(message)

    def join(self, timeout: float = 10.0) -> None:
        for proc in self.procs:
            proc.join(timeout)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for pipe in self.pipes:
            pipe.close()


def run_workers(kind: str, configs: list[dict[str, Any]], timeout: float) -> list[dict[str, Any]]:
    workers = Workers(kind, configs)
    try:
        return workers.recv_all(timeout)
    finally:
        workers.join()
