"""The container's health check (`python -m twisted_gw.healthcheck`): the URL it reads from LISTEN, and real runs."""

from __future__ import annotations

import os
import subprocess
import sys

from support import GatewayTestCase, free_port, until
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase

from twisted_gw.healthcheck import health_url

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_check(listen: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LISTEN": listen, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-m", "twisted_gw.healthcheck"], capture_output=True, text=True,
                          env=env, timeout=60, check=False)


class HealthURLTests(SynchronousTestCase):
    def test_first_tcp_or_ssl_listener_on_loopback(self) -> None:
        cases = [
            (["tcp:8000"], "http://127.0.0.1:8000/health?upstreams=1"),
            (["tcp:9000:interface=0.0.0.0"], "http://127.0.0.1:9000/health?upstreams=1"),
            (["tcp:port=9001"], "http://127.0.0.1:9001/health?upstreams=1"),
            (["tcp:9002:interface=\\:\\:"], "http://[::1]:9002/health?upstreams=1"),
            (["tcp:9004:interface=\\:\\:1"], "http://[::1]:9004/health?upstreams=1"),
            (["tcp:9003:interface=192.0.2.7:backlog=10"], "http://192.0.2.7:9003/health?upstreams=1"),
            (["unix:/run/llmgw.sock", "ssl:8443:privateKey=/c/k.pem:certKey=/c/c.pem"],
             "https://127.0.0.1:8443/health?upstreams=1"),
            (["tcp6:8000"], None),
            (["unix:/run/llmgw.sock"], None),
        ]
        for listen, expected in cases:
            self.assertEqual(health_url(listen), expected, listen)


class HealthCheckTests(GatewayTestCase):
    async def test_exit_status_follows_the_gateway_and_its_upstreams(self) -> None:
        await self.start(upstream_check_interval=0.1)
        port = self.gw.url.rsplit(":", 1)[1]
        done = await deferToThread(run_check, f"tcp:{port}:interface=127.0.0.1")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn(f"http://127.0.0.1:{port}/health?upstreams=1: 200", done.stdout)

        await self.fake.crash()  # the upstream goes away: the gateway is up, nothing behind it
        await until(lambda: not self.gw.gateway.app.upstreams_up())
        done = await deferToThread(run_check, f"tcp:{port}")
        self.assertEqual(done.returncode, 1)
        self.assertIn(": 503", done.stderr)
        self.assertIn("no upstream is up", done.stderr)

    async def test_nothing_listening_or_nothing_to_check(self) -> None:
        done = await deferToThread(run_check, f"tcp:{free_port()}")
        self.assertEqual(done.returncode, 1)
        self.assertIn("refused", done.stderr.lower())
        done = await deferToThread(run_check, "unix:/tmp/x.sock")
        self.assertEqual((done.returncode, done.stderr),
                         (1, "llmgw-healthcheck: no tcp: or ssl: listener in LISTEN to check\n"))
