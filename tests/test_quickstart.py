"""The README's quick start, run as written (after its `pip install .`, which tox has done) in a fresh home."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

from support import GatewayTestCase, free_port, reactor
from twisted.internet.threads import deferToThread

from twisted_gw.testing import FakeLlama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTALL = "python3 -m pip install . && "


def quick_start() -> str:
    """The one command under the README's "Quick start" heading."""
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    section = readme.split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block is not None, "no bash block in the quick start"
    lines = block.group(1).strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


class QuickStartTests(GatewayTestCase):
    timeout = 60

    async def test_runs_and_keeps_its_files_out_of_the_checkout(self) -> None:
        command = quick_start()
        self.assertTrue(command.startswith(INSTALL), command)
        self.assertIn("--upstream http://127.0.0.1:8080", command)
        fake = FakeLlama(reactor)
        await fake.start()
        self.addCleanup(fake.stop)
        home = os.path.abspath(self.mktemp())
        os.makedirs(home)
        port = free_port()
        before = set(os.listdir(ROOT))
        # the fake stands where llama-server would; the command gives no --listen, so LISTEN picks the port
        run = command.removeprefix(INSTALL).replace("http://127.0.0.1:8080", fake.url)
        env = {**os.environ, "HOME": home, "LISTEN": f"tcp:{port}:interface=127.0.0.1",
               "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
        env.pop("USERS_FILE", None)
        env.pop("USAGE_DB", None)
        proc = subprocess.Popen(["bash", "-c", run], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)

        def stop() -> object:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
            return deferToThread(proc.communicate, timeout=30)

        self.addCleanup(stop)
        url = f"http://127.0.0.1:{port}"
        await self.wait_until_up(url)
        assert proc.stdout is not None
        key = (await deferToThread(proc.stdout.readline)).strip()  # llmgw-keys prints the key, first
        self.assertTrue(key.startswith("sk-"), key)
        reply = await self.call("GET", "/v1/models", key=key, url=url)
        self.assertEqual(reply.code, 200)
        self.assertIn(b"fake-llama", await reply.text())
        os.killpg(proc.pid, signal.SIGTERM)
        await deferToThread(proc.communicate, timeout=30)

        self.assertEqual(set(os.listdir(ROOT)) - before, set())  # no users.json, twistd.pid, ledger here
        kept = set(os.listdir(os.path.join(home, "llmgw")))
        self.assertIn("users.json", kept)
        self.assertIn("llmgw-usage.sqlite3", kept)
        self.assertNotIn("twistd.pid", kept)
        with open(os.path.join(home, "llmgw", "users.json")) as f:
            self.assertNotIn(key, f.read())
