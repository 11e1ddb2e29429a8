"""
What the stack costs without the gateway: the floor under the suite's latency and memory rows.

    python bench/floor.py [--requests N] [--held N]

Starts on 127.0.0.1 the suite's upstream (bench/paced_upstream.py) and, each in its own process, a bare
twisted.web resource that relays every request through the gateway's own upstream client (twisted_gw.httpclient,
via twisted_gw.upstream) with none of the gateway's work: no key, queue, checks, usage or accounting. Prints,
against direct, the one-connection p50 and the server's CPU per request for GET /v1/models, a non-stream chat
(sent on as is, not assembled) and a stream of 8 chunks; and the same through a Twisted protocol that only
copies bytes between the client's connection and one of its own to the upstream (no HTTP at all: the floor of a
Twisted process in the path). For the non-stream chat also through a lean assembling server (a Twisted protocol,
no twisted.web, Deferred, timer or books: the request's head read in one pass, its key checked, its body sent on
as a stream, the answer assembled with the gateway's own parser and assembler) and through the gateway itself,
in the same minutes: what the gateway's features cost over the smallest Python server doing the same work. Then
a bare twisted.web server holds N streaming requests (headers and one comment written, as the gateway does for a
waiting client) and prints its memory per held request.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def relay(port: int, upstream: str) -> None:
    """The bare relay: twisted.web and the upstream client, nothing else."""
    from twisted.internet import reactor
    from twisted.web import resource as web_resource
    from twisted.web import server

    from twisted_gw.upstream import Upstream, stream_body

    up = Upstream(reactor, upstream)

    class Relay(web_resource.Resource):
        isLeaf = True

        def render(self, request: server.Request) -> object:
            body = request.content.read() if request.content is not None else b""
            d = up.request(request.method, request.uri, [(b"Content-Type", [b"application/json"])],
                           body or None)

            def got(response: object) -> object:
                request.setResponseCode(response.code)
                for name, values in response.headers.getAllRawHeaders():
                    if name.lower() not in (b"transfer-encoding", b"connection", b"content-length"):
                        request.responseHeaders.setRawHeaders(name, values)
                return stream_body(response, request.write).done

            d.addCallback(got).addBoth(lambda _: request.finish())
            return server.NOT_DONE_YET

    site = server.Site(Relay())
    site.log = lambda request: None
    reactor.listenTCP(port, site, interface="127.0.0.1")
    reactor.run()


def tcp_relay(port: int, upstream_port: int) -> None:
    """
    The floor under that: a Twisted protocol copying bytes both ways between
    each client connection and a connection of its own to the upstream, sent
    at once (L{twisted_gw.sendnow}); no HTTP at all.
    """
    from twisted.internet import protocol, reactor

    from twisted_gw.sendnow import write_now

    class Up(protocol.Protocol):
        def __init__(self, down: protocol.Protocol) -> None:
            self.down = down

        def connectionMade(self) -> None:
            self.transport.setTcpNoDelay(True)  # type: ignore[attr-defined]  # (as the gateway's sockets)

        def dataReceived(self, data: bytes) -> None:
            write_now(self.down.transport, data)

        def connectionLost(self, reason: object = None) -> None:
            if self.down.transport is not None:
                self.down.transport.loseConnection()

    class Down(protocol.Protocol):
        up: Up | None = None
        pending = b""

        def connectionMade(self) -> None:
            self.transport.setTcpNoDelay(True)  # type: ignore[attr-defined]
            protocol.ClientCreator(reactor, Up, self).connectTCP("127.0.0.1", upstream_port).addCallback(self._up)

        def _up(self, up: Up) -> None:
            self.up = up
            if self.pending:
                write_now(up.transport, self.pending)
                self.pending = b""

        def dataReceived(self, data: bytes) -> None:
            if self.up is None:
                self.pending += data
            else:
                write_now(self.up.transport, data)

        def connectionLost(self, reason: object = None) -> None:
            if self.up is not None and self.up.transport is not None:
                self.up.transport.loseConnection()

    factory = protocol.Factory()
    factory.protocol = Down
    reactor.listenTCP(port, factory, interface="127.0.0.1")
    reactor.run()


def lean(port: int, upstream_port: int) -> None:
    """
    The smallest server that does the gateway's work for a non-stream chat: one
    upstream connection per client connection, the request's head read in one
    pass (twisted_gw.channel.parse_head), its key checked, its body asked for as
    a stream with usage (twisted_gw.assemble), the chunked answer decoded, its
    events parsed (twisted_gw.sse) and assembled (twisted_gw.assemble), the JSON
    answer written.  Nothing else: no queue, timer, books or error handling.
    """
    import hashlib

    from loadgen import KEY
    from twisted.internet import protocol, reactor

    from twisted_gw import fastjson
    from twisted_gw.assemble import Assembler, as_stream_request
    from twisted_gw.channel import parse_head
    from twisted_gw.sendnow import write_now
    from twisted_gw.sse import SSEParser

    keys = {hashlib.sha256(KEY.encode()).digest(): "bench"}
    host = b"127.0.0.1:%d" % upstream_port

    class Up(protocol.Protocol):
        def __init__(self, down: Down) -> None:
            self.down = down
            self.buf = b""
            self.head = True
            self.assembler = Assembler(True)
            self.parser = SSEParser()

        def connectionMade(self) -> None:
            self.transport.setTcpNoDelay(True)  # type: ignore[attr-defined]
            self.down.upstream_ready(self)

        def start(self) -> None:
            self.buf, self.head, self.assembler, self.parser = b"", True, Assembler(True), SSEParser()

        def dataReceived(self, data: bytes) -> None:
            buf = self.buf + data if self.buf else data
            if self.head:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    self.buf = buf
                    return
                buf, self.head = buf[end + 4:], False
            pos, pieces, done, size = 0, [], False, len(buf)
            while True:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                length = int(buf[pos:eol], 16)
                if not length:
                    done = size >= eol + 4
                    pos = eol + 4 if done else pos
                    break
                end = eol + 2 + length
                if end + 2 > size:
                    break
                pieces.append(buf[eol + 2:end])
                pos = end + 2
            self.buf = buf[pos:]
            for event in self.parser.feed(b"".join(pieces)):
                if event != b"[DONE]":
                    self.assembler.feed_event(event)
            if done:
                body = self.assembler.body()
                write_now(self.down.transport, b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n"
                          b"Content-Length: %d\r\n\r\n%b" % (len(body), body))

    class Down(protocol.Protocol):
        up: Up | None = None
        pending = b""

        def connectionMade(self) -> None:
            self.transport.setTcpNoDelay(True)  # type: ignore[attr-defined]
            protocol.ClientCreator(reactor, Up, self).connectTCP("127.0.0.1", upstream_port)

        def upstream_ready(self, up: Up) -> None:
            self.up = up
            if self.pending:
                self.dataReceived(self.pending)

        def dataReceived(self, data: bytes) -> None:
            if self.up is None:
                self.pending += data
                return
            head = parse_head(data, 16384, 16384, 100)
            if head is None:
                raise ValueError("not one whole request")
            key = dict(head.headers).get(b"Authorization", b"").partition(b" ")[2]
            if hashlib.sha256(key).digest() not in keys:
                raise ValueError("not the key")
            if head.uri == b"/health":
                write_now(self.transport, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                return
            body = as_stream_request(fastjson.loads(head.body))
            self.up.start()
            write_now(self.up.transport, b"POST /v1/chat/completions HTTP/1.1\r\nHost: %b\r\n"
                      b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (host, len(body), body))

    factory = protocol.Factory()
    factory.protocol = Down
    reactor.listenTCP(port, factory, interface="127.0.0.1")
    reactor.run()


def hold(count: int) -> None:
    """A bare twisted.web server holding C{count} streams; prints KB per held request."""
    from twisted.internet import reactor
    from twisted.web import resource as web_resource
    from twisted.web import server

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    held: list[server.Request] = []

    class Hold(web_resource.Resource):
        isLeaf = True

        def render(self, request: server.Request) -> object:
            if request.content is not None:
                request.content.read()
            for name, value in ((b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
                                (b"x-accel-buffering", b"no"), (b"x-queue-position", b"%d" % len(held))):
                request.setHeader(name, value)
            request.write(b": queue position=%d\n\n" % len(held))
            held.append(request)
            return server.NOT_DONE_YET

    def rss_kb() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))

    site = server.Site(Hold())
    site.log = lambda request: None
    port = reactor.listenTCP(0, site, interface="127.0.0.1", backlog=1024)
    gc.collect()
    gc.freeze()
    before = rss_kb()
    loader = subprocess.Popen([sys.executable, __file__, "--clients", str(port.getHost().port), str(count)])
    deadline = time.monotonic() + 180

    def check() -> None:
        if len(held) >= count or time.monotonic() > deadline:
            gc.collect()
            print(f"bare twisted.web holding {len(held)} streams: {(rss_kb() - before) / max(1, len(held)):.1f} KB "
                  "per held request", flush=True)
            loader.terminate()
            reactor.stop()
        else:
            reactor.callLater(0.5, check)

    reactor.callLater(1, check)
    reactor.run()


def clients(port: int, count: int) -> None:
    """Open C{count} streaming requests and keep them open (run as a child of L{hold})."""
    import socket

    from loadgen import build_request, chat

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    raw = build_request("POST", "/v1/chat/completions", port, chat(True))
    socks = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(raw)
        socks.append(s)
    time.sleep(600)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--relay":
        relay(int(sys.argv[2]), sys.argv[3])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--lean":
        lean(int(sys.argv[2]), int(sys.argv[3]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--tcp-relay":
        tcp_relay(int(sys.argv[2]), int(sys.argv[3]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--clients":
        clients(int(sys.argv[2]), int(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000, help="requests per case and path")
    parser.add_argument("--held", type=int, default=10000, help="streams held by the bare server (0: skip)")
    args = parser.parse_args()

    import json

    import suite
    from loadgen import KEY, BlockingClient, build_request, chat

    work = tempfile.mkdtemp()
    with open(os.path.join(work, "users.json"), "w") as f:
        json.dump({"users": {"bench": {"keys": [KEY]}}}, f)
    upstream = suite.start_upstream(work)
    port = suite.free_port()
    bare = suite.Server("bare", [sys.executable, __file__, "--relay", str(port), f"http://127.0.0.1:{upstream.port}"],
                        port, os.path.join(work, "bare.log"))
    tcp_port = suite.free_port()
    tcp = suite.Server("tcp", [sys.executable, __file__, "--tcp-relay", str(tcp_port), str(upstream.port)],
                       tcp_port, os.path.join(work, "tcp.log"))
    lean_port = suite.free_port()
    lean_server = suite.Server("lean", [sys.executable, __file__, "--lean", str(lean_port), str(upstream.port)],
                               lean_port, os.path.join(work, "lean.log"))
    gateway: suite.Server | None = None
    try:
        bare.wait_up("/health")
        tcp.wait_up("/health")
        lean_server.wait_up("/health")
        gateway = suite.start_gateway(work, "gateway", upstream.port, 100, 100)
        for name, method, path, doc in (("GET /v1/models", "GET", "/v1/models", None),
                                        ("chat non-stream", "POST", "/v1/chat/completions", chat(False)),
                                        ("chat stream (8 chunks)", "POST", "/v1/chat/completions", chat(True))):
            conns = {"direct": (BlockingClient(upstream.port), upstream), "tcp": (BlockingClient(tcp_port), tcp),
                     "bare": (BlockingClient(port), bare)}
            if name == "chat non-stream":  # (the lean server does only this)
                conns["lean"] = (BlockingClient(lean_port), lean_server)
                conns["gateway"] = (BlockingClient(gateway.port), gateway)
            times: dict[str, list[float]] = {p: [] for p in conns}
            cpu = {p: 0.0 for p in conns}
            raws = {p: build_request(method, path, s.port, doc) for p, (_, s) in conns.items()}
            for p, (client, _) in conns.items():
                for _ in range(100):
                    client.request(raws[p])
            for block in range(args.requests // 50):
                for p in suite.rotate(list(conns), block):
                    client, server = conns[p]
                    c0 = server.cpu()
                    for _ in range(50):
                        response, start, end = client.request(raws[p])
                        if response.status != 200:
                            raise SystemExit(f"{name} via {p}: status {response.status}")
                        times[p].append(end - start)
                    cpu[p] += server.cpu() - c0
            d, t, b = (statistics.median(times[p]) * 1e3 for p in ("direct", "tcp", "bare"))
            n = len(times["bare"])
            print(f"{name:24s} p50 direct {d:.3f} ms, TCP relay {t:.3f} ms (+{t - d:.3f}), bare relay {b:.3f} ms "
                  f"(+{b - d:.3f}); CPU per request: upstream {cpu['direct'] / n * 1e6:.0f} us, TCP relay "
                  f"{cpu['tcp'] / n * 1e6:.0f} us, bare relay {cpu['bare'] / n * 1e6:.0f} us", flush=True)
            if "lean" in times:
                lean_p50, gateway_p50 = (statistics.median(times[p]) * 1e3 for p in ("lean", "gateway"))
                print(f"{'':24s} lean assembling server {lean_p50:.3f} ms (+{lean_p50 - d:.3f}), gateway "
                      f"{gateway_p50:.3f} ms (+{gateway_p50 - d:.3f}); CPU per request: lean "
                      f"{cpu['lean'] / n * 1e6:.0f} us, gateway {cpu['gateway'] / n * 1e6:.0f} us", flush=True)
    finally:
        if gateway is not None:
            gateway.stop()
        lean_server.stop()
        tcp.stop()
        bare.stop()
        upstream.stop()
    if args.held:
        hold(args.held)


if __name__ == "__main__":
    main()
