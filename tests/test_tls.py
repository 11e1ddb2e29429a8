"""Native TLS: handshake and host name checks, TLS 1.2 minimum, reload on SIGHUP, HTTPS upstreams, llmgw-tls."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import warnings
from typing import Any

import trustme
from support import (
    ALICE,
    KEYS,
    TWISTD,
    Collector,
    GatewayTestCase,
    chat_body,
    content_needle,
    free_port,
    reactor,
)
from test_healthcheck import run_check
from twisted.internet import task
from twisted.internet.ssl import Certificate
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool, ResponseFailed
from twisted.web.http_headers import Headers

from twisted_gw.config import Config, UpstreamSpec
from twisted_gw.service import Gateway
from twisted_gw.testing import BytesProducer, FakeLlama
from twisted_gw.tls import ReloadingContextFactory, server_endpoint
from twisted_gw.tlsgen import main as tls_main


def write(path: str, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return path


class TLSTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.users = write(os.path.join(self.dir, "users.json"), json.dumps(KEYS).encode())

    def agent(self, ca_pem: bytes) -> Agent:
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        policy = BrowserLikePolicyForHTTPS(trustRoot=Certificate.loadPEM(ca_pem))
        return Agent(reactor, contextFactory=policy, pool=pool)

    def issue(self, ca: trustme.CA, name: str, *hosts: str) -> tuple[str, str]:
        leaf = ca.issue_cert(*hosts)
        key = write(os.path.join(self.dir, f"{name}-key.pem"), leaf.private_key_pem.bytes())
        cert = write(os.path.join(self.dir, f"{name}-cert.pem"), b"".join(b.bytes() for b in leaf.cert_chain_pems))
        return key, cert

    async def serve(self, key: str, cert: str, fake: FakeLlama | None = None, **config: Any) -> tuple[Gateway, int]:
        self.fake = fake or FakeLlama(reactor)
        if not self.fake.listening:
            await self.fake.start()
            self.addCleanup(self.fake.stop)
        config.setdefault("upstreams", (UpstreamSpec(config.pop("upstream", self.fake.url)),))
        config.setdefault("upstream_check_interval", 0)
        gateway = Gateway(Config(users_file=self.users, usage_db="none", **config), reactor)
        endpoint, factory = server_endpoint(reactor, f"ssl:0:privateKey={key}:certKey={cert}:interface=127.0.0.1")
        assert factory is not None
        gateway.tls_contexts.append(factory)
        gateway.startService()
        self.addCleanup(gateway.stopService)
        port = await endpoint.listen(gateway.site)
        self.addCleanup(port.stopListening)
        return gateway, port.getHost().port  # type: ignore[attr-defined]

    async def get(self, agent: Agent, url: str) -> tuple[int, bytes]:
        response = await agent.request(b"GET", url.encode(), Headers({"Authorization": [f"Bearer {ALICE}"]}))
        body = Collector()
        response.deliverBody(body)
        return response.code, await body.done

    async def test_handshake_and_host_name(self) -> None:
        ca = trustme.CA()
        key, cert = self.issue(ca, "good", "localhost", "127.0.0.1")
        _, port = await self.serve(key, cert)
        code, body = await self.get(self.agent(ca.cert_pem.bytes()), f"https://localhost:{port}/health")
        self.assertEqual((code, json.loads(body)), (200, {"status": "ok"}))
        code, _ = await self.get(self.agent(ca.cert_pem.bytes()), f"https://localhost:{port}/v1/models")
        self.assertEqual(code, 200)
        # another CA's client refuses the certificate
        with self.assertRaises(ResponseFailed):
            await self.get(self.agent(trustme.CA().cert_pem.bytes()), f"https://localhost:{port}/health")

    async def test_chain_in_the_certificate_file_is_served(self) -> None:
        root = trustme.CA()
        key, cert = self.issue(root.create_child_ca(), "leaf", "localhost")
        with open(cert, "rb") as f:
            self.assertEqual(f.read().count(b"BEGIN CERTIFICATE"), 2)  # the leaf, then the intermediate
        _, port = await self.serve(key, cert)
        # a client that trusts only the root needs the intermediate from the server
        code, _ = await self.get(self.agent(root.cert_pem.bytes()), f"https://localhost:{port}/health")
        self.assertEqual(code, 200)

    async def test_container_health_check_over_tls(self) -> None:
        key, cert = self.issue(trustme.CA(), "lan", "gpu-box.lan")  # a LAN name, checked on 127.0.0.1
        _, port = await self.serve(key, cert)
        done = await deferToThread(run_check, f"ssl:{port}:privateKey={key}:certKey={cert}:interface=127.0.0.1")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn(f"https://127.0.0.1:{port}/health?upstreams=1: 200", done.stdout)

    async def test_wrong_host_name_is_refused_by_the_client(self) -> None:
        ca = trustme.CA()
        key, cert = self.issue(ca, "other", "other.example")
        _, port = await self.serve(key, cert)
        with self.assertRaises(ResponseFailed):
            await self.get(self.agent(ca.cert_pem.bytes()), f"https://localhost:{port}/health")

    async def test_tls_1_1_is_refused(self) -> None:
        ca = trustme.CA()
        key, cert = self.issue(ca, "good", "localhost")
        _, port = await self.serve(key, cert)

        # the old versions this client offers are deprecated in Python's ssl module: on purpose here
        caught = warnings.catch_warnings()
        caught.__enter__()
        self.addCleanup(caught.__exit__, None, None, None)
        warnings.filterwarnings("ignore", r"ssl\.TLSVersion\.TLSv1(_1)? is deprecated", DeprecationWarning)

        def handshake(version: ssl.TLSVersion, to: int = port) -> str:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            context.set_ciphers("DEFAULT:@SECLEVEL=0")
            context.minimum_version = ssl.TLSVersion.TLSv1
            context.maximum_version = version
            with socket.create_connection(("127.0.0.1", to), timeout=10) as raw:
                try:
                    with context.wrap_socket(raw, server_hostname="localhost") as tls:
                        return str(tls.version())
                except ssl.SSLError as e:
                    return f"refused: {e.reason}"

        # control: this client does speak TLS 1.1 to a server that allows it, so a refusal is the gateway's
        permissive = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        permissive.load_cert_chain(cert, key)
        permissive.set_ciphers("DEFAULT:@SECLEVEL=0")
        permissive.minimum_version = ssl.TLSVersion.TLSv1
        with socket.create_server(("127.0.0.1", 0)) as server:

            def accept_one() -> None:
                conn, _ = server.accept()
                with conn, contextlib.suppress(ssl.SSLError, OSError):
                    permissive.wrap_socket(conn, server_side=True).close()

            accepting = deferToThread(accept_one)
            control = await deferToThread(handshake, ssl.TLSVersion.TLSv1_1, server.getsockname()[1])
            await accepting
        self.assertEqual(control, "TLSv1.1")
        self.assertTrue((await deferToThread(handshake, ssl.TLSVersion.TLSv1_1)).startswith("refused"))
        self.assertIn(await deferToThread(handshake, ssl.TLSVersion.TLSv1_2), ("TLSv1.2",))
        self.assertEqual(await deferToThread(handshake, ssl.TLSVersion.MAXIMUM_SUPPORTED), "TLSv1.3")

    async def test_sighup_swaps_the_certificate_while_a_stream_goes_on(self) -> None:
        old_ca, new_ca = trustme.CA(), trustme.CA()
        key, cert = self.issue(old_ca, "live", "localhost")
        _, port = await self.serve(key, cert, fake=FakeLlama(reactor, manual=True), max_concurrent=2)
        old_agent = self.agent(old_ca.cert_pem.bytes())
        response = await old_agent.request(
            b"POST", f"https://localhost:{port}/v1/chat/completions".encode(),
            Headers({"Authorization": [f"Bearer {ALICE}"], "Content-Type": ["application/json"]}),
            BytesProducer(chat_body(True)),
        )
        stream = Collector()
        response.deliverBody(stream)
        self.fake.release(1)
        await stream.wait_for(content_needle("Hello"))
        # new files in place, then SIGHUP
        leaf = new_ca.issue_cert("localhost")
        write(key, leaf.private_key_pem.bytes())
        write(cert, b"".join(b.bytes() for b in leaf.cert_chain_pems))
        os.kill(os.getpid(), signal.SIGHUP)
        await task.deferLater(reactor, 0.1, lambda: None)
        code, _ = await self.get(self.agent(new_ca.cert_pem.bytes()), f"https://localhost:{port}/health")
        self.assertEqual(code, 200)
        with self.assertRaises(ResponseFailed):
            await self.get(self.agent(old_ca.cert_pem.bytes()), f"https://localhost:{port}/health")
        # the stream opened with the old certificate goes on to its end
        self.fake.release(len(self.fake.reply))
        self.assertTrue((await stream.done).endswith(b"data: [DONE]\n\n"))

    async def test_https_upstream_with_a_private_ca_and_the_upstream_key(self) -> None:
        ca = trustme.CA()
        up_key, up_cert = self.issue(ca, "upstream", "localhost")
        fake = FakeLlama(reactor)
        await fake.start(ReloadingContextFactory(up_key, up_cert))
        self.addCleanup(fake.stop)
        fake_url = fake.url.replace("127.0.0.1", "localhost")
        ca_file = write(os.path.join(self.dir, "upstream-ca.pem"), ca.cert_pem.bytes())
        front_ca = trustme.CA()
        key, cert = self.issue(front_ca, "front", "localhost")
        gateway, port = await self.serve(key, cert, fake=fake, upstream=fake_url, upstream_ca=ca_file,
                                         upstream_api_key="up-secret")
        agent = self.agent(front_ca.cert_pem.bytes())
        code, body = await self.get(agent, f"https://localhost:{port}/v1/models")
        self.assertEqual(code, 200, body)
        seen = fake.requests[-1]
        self.assertEqual(seen.headers.getRawHeaders(b"authorization"), [b"Bearer up-secret"])
        # without the private CA, the upstream's certificate is not trusted
        await gateway.stopService()
        _, port2 = await self.serve(key, cert, fake=fake, upstream=fake_url)
        code, body = await self.get(agent, f"https://localhost:{port2}/v1/models")
        self.assertEqual(code, 502)
        self.assertEqual(json.loads(body)["error"]["code"], "upstream_unreachable")

    async def test_llmgw_tls_certificate_serves_and_verifies(self) -> None:
        out = os.path.join(self.dir, "tls")
        self.assertEqual(tls_main(["--host", "localhost", "--ip", "127.0.0.1", "--out", out]), 0)
        self.assertEqual(os.stat(os.path.join(out, "key.pem")).st_mode & 0o777, 0o600)
        self.assertEqual(tls_main(["--host", "localhost", "--out", out]), 1)  # no silent overwrite
        _, port = await self.serve(os.path.join(out, "key.pem"), os.path.join(out, "cert.pem"))
        with open(os.path.join(out, "cert.pem"), "rb") as f:
            cert = f.read()
        code, _ = await self.get(self.agent(cert), f"https://localhost:{port}/health")
        self.assertEqual(code, 200)


class TwistdTLSTests(GatewayTestCase):
    timeout = 60

    async def test_tcp_and_ssl_listeners_and_sighup_in_twistd(self) -> None:
        workdir, port = await self.prepare_subprocess(FakeLlama(reactor))
        tls_port = free_port()
        old_ca, new_ca = trustme.CA(), trustme.CA()
        key, cert = os.path.join(workdir, "key.pem"), os.path.join(workdir, "cert.pem")

        def install(ca: trustme.CA) -> None:
            leaf = ca.issue_cert("localhost")
            write(key, leaf.private_key_pem.bytes())
            write(cert, b"".join(b.bytes() for b in leaf.cert_chain_pems))

        install(old_ca)
        proc = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "llmgw", "--upstream", self.fake.url, "--usage-db", "none",
             "--listen", f"tcp:{port}:interface=127.0.0.1",
             "--listen", f"ssl:{tls_port}:privateKey={key}:certKey={cert}:interface=127.0.0.1"],
            cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.addCleanup(proc.kill)
        await self.wait_until_up(f"http://127.0.0.1:{port}")
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)

        async def health(ca: trustme.CA) -> int:
            policy = BrowserLikePolicyForHTTPS(trustRoot=Certificate.loadPEM(ca.cert_pem.bytes()))
            response = await Agent(reactor, contextFactory=policy, pool=pool).request(
                b"GET", f"https://localhost:{tls_port}/health".encode())
            body = Collector()
            response.deliverBody(body)
            await body.done
            return response.code

        self.assertEqual(await health(old_ca), 200)
        install(new_ca)
        proc.send_signal(signal.SIGHUP)
        for _ in range(100):
            try:
                if await health(new_ca) == 200:
                    break
            except ResponseFailed:
                await task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(await health(new_ca), 200)
        proc.terminate()
        output, _ = await deferToThread(proc.communicate, timeout=30)
        self.assertIn("TLS certificate reloaded", output)


class ListenBacklogTests(SynchronousTestCase):
    def test_listeners_queue_1024_pending_connections_unless_told(self) -> None:
        leaf = trustme.CA().issue_cert("localhost")
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        key = write(os.path.join(folder, "key.pem"), leaf.private_key_pem.bytes())
        cert = write(os.path.join(folder, "cert.pem"), leaf.cert_chain_pems[0].bytes())
        cases = {
            "tcp:8000": 1024,
            "tcp:8000:interface=127.0.0.1:backlog=7": 7,
            f"ssl:8443:privateKey={key}:certKey={cert}": 1024,
            f"ssl:8443:privateKey={key}:certKey={cert}:backlog=9": 9,
        }
        for description, backlog in cases.items():
            endpoint, _ = server_endpoint(reactor, description)
            self.assertEqual(endpoint._backlog, backlog, description)  # type: ignore[attr-defined]
