"""The installed C{twistd llmgw} command, run as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess

from support import ALICE, TWISTD, GatewayTestCase, chat_body, free_port, reactor
from twisted.internet import task
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from twisted_gw.testing import FakeLlama


def twistd(*args: str, env: dict[str, str] | None = None, cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TWISTD, "-n", "--pidfile=", "llmgw", *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})}, cwd=cwd)


class CommandLineTests(TestCase):
    def test_help_lists_every_option(self) -> None:
        result = twistd("--help")
        self.assertEqual(result.returncode, 0, result.stderr)
        for option, env in [("--listen", "LISTEN"), ("--upstream", "UPSTREAM_URL"),
                            ("--max-concurrent", "MAX_CONCURRENT"), ("--users", "USERS_FILE"),
                            ("--queue-events", "QUEUE_EVENTS"), ("--keepalive-interval", "KEEPALIVE_INTERVAL")]:
            self.assertIn(option, result.stdout)
            self.assertIn(env, result.stdout)

    def test_bad_value_is_one_line_not_a_traceback(self) -> None:
        for args, env in [(("--max-concurrent", "zero"), {}), ((), {"MAX_CONCURRENT": "0"}),
                          (("--upstream", "localhost:8080"), {}), (("--listen", "tcp:notaport"), {})]:
            result = twistd(*args, env=env)
            self.assertNotEqual(result.returncode, 0)
            lines = result.stderr.strip().splitlines()
            self.assertEqual(len(lines), 1, result.stderr)
            self.assertTrue(lines[0].startswith("llmgw: error: "), lines[0])
            self.assertNotIn("Traceback", result.stdout + result.stderr)


class SubprocessGatewayTests(GatewayTestCase):
    timeout = 60

    async def test_twistd_llmgw_serves_in_front_of_the_fake(self) -> None:
        workdir, port = await self.prepare_subprocess(FakeLlama(reactor), users={})
        down = f"http://127.0.0.1:{free_port()}"  # a second upstream, never up
        # no users file in the working directory: starts, warns, nobody gets in
        proc = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "llmgw", "--listen", f"tcp:{port}:interface=127.0.0.1"],
            env={**os.environ, "UPSTREAM_URL": f"{self.fake.url}#slots=3, {down}", "USERS_POLL_INTERVAL": "0.2"},
            cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )

        def stop() -> object:
            proc.terminate()
            return deferToThread(proc.communicate, timeout=30)

        self.addCleanup(stop)
        url = f"http://127.0.0.1:{port}"
        await self.wait_until_up(url)
        reply = await self.call("GET", "/health", key=None, url=url)
        self.assertEqual(await reply.json(), {"status": "ok"})
        self.assertEqual((await self.call("GET", "/v1/models", url=url)).code, 401)
        with open(os.path.join(workdir, "users.json"), "w") as f:
            json.dump({ALICE: "alice"}, f)
        for _ in range(100):
            reply = await self.call("POST", "/v1/chat/completions", chat_body(True), url=url)
            if reply.code == 200:
                break
            await reply.text()
            await task.deferLater(reactor, 0.05, lambda: None)
        body = await reply.text()
        self.assertTrue(body.endswith(b"data: [DONE]\n\n"))
        metrics = await (await self.call("GET", "/metrics", key=None, url=url)).json()
        self.assertEqual(metrics["users"]["alice"]["requests"], 1)
        self.assertEqual([(u["url"], u["places"]) for u in metrics["upstreams"]], [(self.fake.url, 3), (down, 1)])
        proc.terminate()
        output, _ = await deferToThread(proc.communicate, timeout=30)
        self.assertIn("does not exist", output)
        self.assertIn("users file", output)
        # twistd exits by re-raising the SIGTERM it handled, after a clean shutdown
        self.assertIn(proc.returncode, (0, -15), output)
        self.assertIn("Server Shut Down", output)
