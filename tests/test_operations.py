"""
Operations: what the gateway says at startup, how it fails when it cannot listen, what it does and says while
its upstreams are down, and what the access log says of a request that left the queue.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from typing import Any, cast

from support import ALICE, BOB, KEYS, TWISTD, GatewayTestCase, free_port, reactor, sse_data, until
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from twisted_gw.config import Config
from twisted_gw.testing import FakeLlama


def logged(test: GatewayTestCase) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    test.addCleanup(globalLogPublisher.removeObserver, observer)
    return events


def lines(events: list[dict[str, Any]], namespace: str = "llmgw") -> list[str]:
    from twisted.logger import formatEvent

    return [formatEvent(e) for e in events if e.get("log_namespace") == namespace]


class StartupTests(GatewayTestCase):
    timeout = 60

    async def test_a_port_in_use_stops_twistd_with_one_line(self) -> None:
        """Item 1: twistd logged a traceback and kept running, listening nowhere."""
        workdir, port = await self.prepare_subprocess(FakeLlama(reactor))
        import socket

        taken = socket.socket()
        taken.bind(("127.0.0.1", port))
        taken.listen()
        self.addCleanup(taken.close)
        result = await deferToThread(subprocess.run, [
            TWISTD, "-n", "--pidfile=", "llmgw", "--listen", f"tcp:{port}:interface=127.0.0.1",
            "--upstream", self.fake.url, "--usage-db", "none",
        ], cwd=workdir, capture_output=True, text=True, timeout=30)
        self.assertNotEqual(result.returncode, 0)
        output = result.stdout + result.stderr
        [line] = [line for line in output.splitlines() if "llmgw" in line and "listen" in line]
        self.assertIn(f"cannot listen on tcp:{port}:interface=127.0.0.1", line)
        self.assertIn("Address already in use", line)
        self.assertNotIn("Traceback", output)

    async def test_one_line_for_each_part_at_startup_and_no_password(self) -> None:
        fake = FakeLlama(reactor, slots=3)
        workdir, port = await self.prepare_subprocess(fake)
        secret_url = fake.url.replace("http://", "http://bob:hunter2@")
        proc = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "llmgw", "--listen", f"tcp:{port}:interface=127.0.0.1",
             "--upstream", secret_url, "--usage-db", "ledger.sqlite3", "--upstream-check-interval", "0.2"],
            cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.addCleanup(proc.kill)
        url = f"http://127.0.0.1:{port}"
        await self.wait_until_up(url)
        await task.deferLater(reactor, 0.6, lambda: None)  # (a check or two)
        reply = await self.call("GET", "/v1/models", url=url)
        await reply.text()
        proc.terminate()
        output, _ = await deferToThread(proc.communicate, timeout=30)
        self.assertNotIn("hunter2", output)
        bare = fake.url
        for expected in (
            f"listening on tcp:{port}:interface=127.0.0.1 (127.0.0.1:{port})",
            f"upstream http://bob:***@{bare.removeprefix('http://')}: places read from llama.cpp's /props",
            f"users file users.json loaded: {len(KEYS)} users",
            f"usage ledger: {os.path.join(workdir, 'ledger.sqlite3')}",
            f"dashboard: http://127.0.0.1:{port}/dashboard (metrics for clients of loopback only",
            f"upstream {bare} up: 3 places from /props",
        ):
            self.assertIn(expected, output)
        # the upstream saw its credentials, as Basic authorization
        self.assertEqual(fake.requests[-1].headers.getRawHeaders(b"authorization"), [b"Basic Ym9iOmh1bnRlcjI="])

    async def test_sighup_reloads_the_users_file_and_never_ends_the_process(self) -> None:
        """systemd's ExecReload sends SIGHUP: without a handler (no TLS listener) it killed the gateway."""
        workdir, port = await self.prepare_subprocess(FakeLlama(reactor))
        proc = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "llmgw", "--listen", f"tcp:{port}:interface=127.0.0.1",
             "--upstream", self.fake.url, "--usage-db", "none", "--users-poll-interval", "3600"],
            cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.addCleanup(proc.kill)
        url = f"http://127.0.0.1:{port}"
        await self.wait_until_up(url)
        with open(os.path.join(workdir, "users.json.new"), "w") as f:
            json.dump({**KEYS, "sk-carol-key": "carol"}, f)
        os.replace(os.path.join(workdir, "users.json.new"), os.path.join(workdir, "users.json"))
        reply = await self.call("GET", "/v1/models", key="sk-carol-key", url=url)
        self.assertEqual(reply.code, 401)  # (the next poll is an hour away)
        await reply.text()
        proc.send_signal(signal.SIGHUP)
        codes: list[int] = []

        async def carol_is_in() -> bool:
            reply = await self.call("GET", "/v1/models", key="sk-carol-key", url=url)
            await reply.text()
            codes.append(reply.code)
            return reply.code == 200

        for _ in range(100):
            if await carol_is_in():
                break
            await task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(codes[-1], 200)
        self.assertIsNone(proc.poll())
        proc.terminate()
        output, _ = await deferToThread(proc.communicate, timeout=30)
        self.assertIn("reloading on SIGHUP: the users file", output)
        self.assertIn("users file users.json loaded: 3 users", output)


class UpstreamDownTests(GatewayTestCase):
    async def test_down_fails_fast_and_up_again_serves(self) -> None:
        """Item 2: a request hung until its client gave up, and no line ever named the upstream."""
        events = logged(self)
        port = free_port()
        await self.start(upstream=f"http://127.0.0.1:{port}", upstream_check_interval=0.1, upstream_down_grace=0.4)
        # a stream that waits while the upstream is down, within the grace
        waiting = await self.chat(stream=True, key=BOB)
        await until(lambda: self.gw.gateway.admission.waiting == 1)
        body = await waiting.text()  # within the grace and a check or two
        self.assertEqual(json.loads(sse_data(body)[-1])["error"]["code"], "no_upstream_available")
        started = reactor.seconds()
        reply = await self.chat(stream=False)
        self.assertEqual(reply.code, 503)
        self.assertEqual(reply.header("Retry-After"), b"10")
        self.assertEqual((await reply.json())["error"]["code"], "no_upstream_available")
        self.assertLess(reactor.seconds() - started, 1.0)
        health = await self.call("GET", "/health?upstreams=1", key=None)
        self.assertEqual((health.code, await health.json()), (503, {"status": "no upstream is up"}))
        plain = await self.call("GET", "/health", key=None)
        self.assertEqual((plain.code, await plain.json()), (200, {"status": "ok"}))
        self.assertTrue(any(f"upstream http://127.0.0.1:{port} down: " in line and "refused" in line.lower()
                            for line in lines(events)), lines(events))
        # it comes up
        fake = FakeLlama(reactor)
        await fake.start(port=port)
        self.addCleanup(fake.stop)
        await until(lambda: any("up: 1 places from /props" in line for line in lines(events)))
        reply = await self.chat(stream=False)
        self.assertEqual(reply.code, 200)
        await reply.text()
        health = await self.call("GET", "/health?upstreams=1", key=None)
        self.assertEqual((health.code, await health.json()), (200, {"status": "ok"}))

    async def test_a_loading_upstream_is_waited_for(self) -> None:
        events = logged(self)
        await self.start(fake=FakeLlama(reactor, loading=True), upstream_check_interval=0.1,
                         upstream_down_grace=0.2)
        await until(lambda: self.gw.gateway.router.routes[0].state == "loading")
        waiting = Deferred.fromCoroutine(self.chat(stream=False))
        await task.deferLater(reactor, 0.8, lambda: None)
        self.assertFalse(waiting.called)  # still waiting: a loading server answers soon
        self.assertEqual(self.gw.gateway.admission.waiting, 1)
        self.assertTrue(any("loading" in line for line in lines(events)))
        self.fake.loading = False
        reply = await waiting
        self.assertEqual(reply.code, 200)
        await reply.text()


class QueueWaitTests(GatewayTestCase):
    async def test_a_request_that_left_the_queue_says_how_long_it_waited(self) -> None:
        """Item 3: a request that waited 20 s and left said wait=0.000s time=20.000s."""
        events = logged(self)
        clock = task.Clock()
        await self.start(fake=FakeLlama(reactor, manual=True), max_concurrent=1, clock=clock)
        holder = await self.chat(stream=True)
        leaving = await self.chat(stream=True, key=BOB)
        await leaving.body.wait_for(b": queue position=1")
        clock.advance(7.5)
        leaving.body.abort()
        await until(lambda: not self.gw.gateway.admission.waiting)
        self.fake.release(len(self.fake.reply))
        await holder.text()
        clock.advance(0)  # (the books' turn)
        [line] = [e for e in events if e.get("log_namespace") == "llmgw.access" and e.get("user") == "bob"]
        self.assertEqual((line["cancelled"], line["queue_wait"], line["duration"]), (True, 7.5, 7.5))
        self.assertEqual(ALICE, "sk-alice-key")


class SystemdUnitTests(SynchronousTestCase):
    """docs/operations.md's units: verified by systemd where it is installed, parsed everywhere."""

    def units(self) -> list[str]:
        with open(os.path.join(os.path.dirname(__file__), "..", "docs", "operations.md")) as f:
            text = f.read()
        blocks = re.findall(r"```ini\n(.*?)```", text, re.S)
        return [b for b in blocks if b.startswith("[Unit]")]

    def test_the_units_parse_and_verify(self) -> None:
        units = self.units()
        self.assertEqual(len(units), 2)  # the gateway's and llama-server's
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        verify = shutil.which("systemd-analyze")
        for name, unit in zip(("llmgw.service", "llama-server.service"), units, strict=True):
            parser = configparser.ConfigParser(interpolation=None, strict=True, delimiters=("=",))
            parser.optionxform = str  # type: ignore[assignment,method-assign]
            parser.read_string(unit)
            self.assertEqual(parser.sections(), ["Unit", "Service", "Install"])
            self.assertEqual(parser["Install"]["WantedBy"], "multi-user.target")
            command = parser["Service"]["ExecStart"].split()
            if name == "llmgw.service":
                self.assertEqual(command[1:], ["--nodaemon", "--pidfile=", "llmgw"])
                self.assertEqual(parser["Service"]["ExecReload"], "/bin/kill -HUP $MAINPID")
                # longer than the drain, so that systemd does not kill a gateway finishing its requests
                self.assertGreater(int(parser["Service"]["TimeoutStopSec"]), Config().drain_timeout)
            if verify is None:
                continue
            # the same unit, its program where this machine has one (verify checks that it is executable)
            local = unit.replace(command[0], TWISTD if name == "llmgw.service" else sys.executable)
            path = os.path.join(folder, name)
            with open(path, "w") as f:
                f.write(local)
            done = subprocess.run([verify, "verify", path], capture_output=True, text=True, timeout=60)
            self.assertEqual((done.returncode, done.stderr), (0, ""), name)
