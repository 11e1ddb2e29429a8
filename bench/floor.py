"""
What the stack costs without the gateway: the floor under the suite's latency and memory rows.

    python bench/floor.py [--requests N] [--held N]

Starts on 127.0.0.1 the suite's upstream (bench/paced_upstream.py) and, each
in its own process, a bare twisted.web resource that relays every request
through the gateway's own upstream client (twisted_gw.httpclient, via
twisted_gw.upstream) with none of the gateway's work: no key, queue, checks,
usage or accounting.  Prints, against direct, the one-connection p50 and the
server's CPU per request for GET /v1/models, a non-stream chat (sent on as
is, not assembled) and a stream of 8 chunks; and the same through a Twisted
protocol that only copies bytes between the client's connection and one of
its own to the upstream (no HTTP at all: the floor of a Twisted process in the
path).  Then a bare twisted.web server holds N streaming requests (headers and one comment written, as the gateway
does for a waiting client) and prints its memory per held request.
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

    import suite
    from loadgen import BlockingClient, build_request, chat

    work = tempfile.mkdtemp()
    upstream = suite.start_upstream(work)
    port = suite.free_port()
    bare = suite.Server("bare", [sys.executable, __file__, "--relay", str(port), f"http://127.0.0.1:{upstream.port}"],
                        port, os.path.join(work, "bare.log"))
    tcp_port = suite.free_port()
    tcp = suite.Server("tcp", [sys.executable, __file__, "--tcp-relay", str(tcp_port), str(upstream.port)],
                       tcp_port, os.path.join(work, "tcp.log"))
    try:
        bare.wait_up("/health")
        tcp.wait_up("/health")
        for name, method, path, doc in (("GET /v1/models", "GET", "/v1/models", None),
                                        ("chat non-stream", "POST", "/v1/chat/completions", chat(False)),
                                        ("chat stream (8 chunks)", "POST", "/v1/chat/completions", chat(True))):
            times: dict[str, list[float]] = {"direct": [], "tcp": [], "bare": []}
            cpu = {"direct": 0.0, "tcp": 0.0, "bare": 0.0}
            conns = {"direct": (BlockingClient(upstream.port), upstream), "tcp": (BlockingClient(tcp_port), tcp),
                     "bare": (BlockingClient(port), bare)}
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
    finally:
        tcp.stop()
        bare.stop()
        upstream.stop()
    if args.held:
        hold(args.held)


if __name__ == "__main__":
    main()
