"""What can be checked of the Docker deployment without a Docker engine."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import yaml
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from twisted_gw.web.users import parse_users

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCKER = os.path.join(ROOT, "docker")
INSTALL = os.path.join(DOCKER, "install.sh")


def env_example() -> dict[str, str]:
    values = {}
    with open(os.path.join(DOCKER, ".env.example")) as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                name, _, value = line.strip().partition("=")
                values[name] = value
    return values


class ComposeTests(SynchronousTestCase):
    def setUp(self) -> None:
        with open(os.path.join(DOCKER, "compose.yaml")) as f:
            self.text = f.read()
        self.compose = yaml.safe_load(self.text)

    def test_every_variable_is_documented(self) -> None:
        used = set(re.findall(r"\$\{([A-Z0-9_]+)", self.text))
        self.assertIn("TUNNEL_TOKEN", used)
        self.assertEqual(used - set(env_example()), set())

    def test_services_paths_and_pins(self) -> None:
        gateway, tunnel = self.compose["services"]["llmgw"], self.compose["services"]["cloudflared"]
        self.assertEqual(tunnel["profiles"], ["tunnel"])  # not started without a token
        self.assertIn("gateway", gateway["networks"]["default"]["aliases"])
        build = gateway["build"]
        self.assertTrue(os.path.isfile(os.path.join(DOCKER, build["context"], build["dockerfile"])))
        self.assertIn("./config:/config", gateway["volumes"])
        self.assertTrue(any(v.startswith("ledger:") for v in gateway["volumes"]))
        self.assertIn("ledger", self.compose["volumes"])
        image, _, tag = tunnel["image"].partition(":")
        self.assertEqual(image, "cloudflare/cloudflared")
        self.assertRegex(tag, r"^\d{4}\.\d+\.\d+$")  # pinned, not "latest"
        self.assertEqual(tunnel["environment"]["TUNNEL_TOKEN"], "${TUNNEL_TOKEN}")
        self.assertTrue(any(str(p).endswith(":8000") for p in gateway["ports"]))
        postgres = self.compose["services"]["postgres"]
        self.assertEqual(postgres["profiles"], ["cluster"])  # the shared ledger, only when asked for
        self.assertRegex(postgres["image"], r"^postgres:\d+\.\d+$")
        self.assertEqual(gateway["environment"]["USAGE_DB"], "${USAGE_DB:-/data/llmgw-usage.sqlite3}")

    def test_the_cluster_profile_runs_two_replicas_on_one_store(self) -> None:
        services = self.compose["services"]
        first, second, redis = services["llmgw"], services["llmgw-2"], services["redis"]
        self.assertEqual((second["profiles"], redis["profiles"]), (["cluster"], ["cluster"]))
        self.assertNotIn("profiles", first)
        self.assertRegex(redis["image"], r"^redis:\d+\.\d+\.\d+$")
        # the same gateway, environment and users; its own ports and ledger volume
        for key in ("image", "build", "environment", "extra_hosts"):
            self.assertEqual(first[key], second[key], key)
        self.assertEqual(first["environment"]["STATE_URL"], "${STATE_URL:-}")
        self.assertIn("./config:/config", second["volumes"])
        self.assertTrue(any(v.startswith("ledger-2:") for v in second["volumes"]))
        self.assertIn("ledger-2", self.compose["volumes"])
        self.assertFalse(set(map(str, first["ports"])) & set(map(str, second["ports"])))
        self.assertEqual(second["depends_on"], ["redis"])


class DockerfileTests(SynchronousTestCase):
    def setUp(self) -> None:
        with open(os.path.join(DOCKER, "Dockerfile")) as f:
            self.lines = [line.strip() for line in f]

    def instruction(self, name: str) -> list[str]:
        return [line[len(name) + 1:] for line in self.lines if line.startswith(name + " ")]

    def test_entrypoint_runs(self) -> None:
        (entrypoint,) = self.instruction("ENTRYPOINT")
        argv = json.loads(entrypoint)
        self.assertEqual(argv, ["twistd", "-n", "llmgw"])
        # the same command, in this test run's own clean virtualenv
        twistd = os.path.join(os.path.dirname(sys.executable), argv[0])
        result = subprocess.run([twistd, *argv[1:], "--help"], capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("--upstream", result.stdout)

    def test_non_root_healthcheck_plugin_cache_and_copied_paths(self) -> None:
        (user,) = self.instruction("USER")
        self.assertNotIn(user, ("root", "0"))
        self.assertTrue(any(line.startswith("HEALTHCHECK") for line in self.lines))
        self.assertTrue(any("getPlugins(IPlugin)" in line for line in self.lines))
        for copy in self.instruction("COPY"):
            for source in copy.split()[:-1]:
                self.assertTrue(os.path.exists(os.path.join(ROOT, source)), source)


class InstallerTests(SynchronousTestCase):
    def run_install(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", INSTALL, *args], capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)

    def test_syntax_and_shellcheck(self) -> None:
        self.assertEqual(subprocess.run(["bash", "-n", INSTALL]).returncode, 0)
        shellcheck = shutil.which("shellcheck")
        if shellcheck is None:
            raise SkipTest("shellcheck is not installed (Debian package shellcheck; .ci/run installs it)")
        result = subprocess.run([shellcheck, INSTALL], capture_output=True, text=True)
        self.assertEqual(result.returncode, 0, result.stdout)

    def test_non_interactive_writes_env_and_users(self) -> None:
        target = os.path.abspath(self.mktemp())
        args = ("--non-interactive", "--no-start", "--dir", target, "--user", "alice",
                "--upstream", "http://127.0.0.1:8080,http://127.0.0.1:8081#slots=4", "--max-concurrent", "auto",
                "--tunnel-token", "tok.en-1")
        result = self.run_install(*args)
        self.assertEqual(result.returncode, 0, result.stderr)
        with open(os.path.join(target, ".env")) as f:
            env = dict(line.strip().split("=", 1) for line in f if "=" in line)
        self.assertEqual(set(env), set(env_example()))
        self.assertEqual((env["UPSTREAM_URL"], env["MAX_CONCURRENT"], env["TUNNEL_TOKEN"], env["COMPOSE_PROFILES"]),
                         ("http://127.0.0.1:8080,http://127.0.0.1:8081#slots=4", "auto", "tok.en-1", "tunnel"))
        self.assertGreater(len(env["METRICS_TOKEN"]), 20)
        self.assertEqual(os.stat(os.path.join(target, ".env")).st_mode & 0o777, 0o600)
        key = re.search(r"shown once\): (sk-\S+)", result.stdout)
        assert key is not None
        with open(os.path.join(target, "config", "users.json"), "rb") as f:
            data = f.read()
        self.assertNotIn(key.group(1).encode(), data)
        self.assertEqual(parse_users(data).lookup(key.group(1)), "alice")
        # a second run changes nothing
        before = data
        again = self.run_install(*args)
        self.assertEqual(again.returncode, 0, again.stderr)
        self.assertIn("keeping", again.stdout)
        with open(os.path.join(target, "config", "users.json"), "rb") as f:
            self.assertEqual(f.read(), before)

    def test_an_older_env_gains_compose_profiles_once(self) -> None:
        """Upgrading: a .env written before cloudflared became a profile runs the tunnel only if it has a token."""
        for token, expected in (("tok.en-1", "tunnel"), ("", "")):
            target = os.path.abspath(self.mktemp())
            os.makedirs(target)
            older = f"UPSTREAM_URL=http://127.0.0.1:8080\nTUNNEL_TOKEN={token}\nLISTEN=tcp:8000\n"
            with open(os.path.join(target, ".env"), "w") as f:
                f.write(older)
            for _ in range(2):
                result = self.run_install("--non-interactive", "--no-start", "--dir", target, "--user", "alice")
                self.assertEqual(result.returncode, 0, result.stderr)
            with open(os.path.join(target, ".env")) as f:
                self.assertEqual(f.read(), older + f"COMPOSE_PROFILES={expected}\n")

    def test_invalid_input_is_refused(self) -> None:
        target = os.path.abspath(self.mktemp())
        for bad in (("--upstream", "ftp://x"), ("--upstream", "http://a:1,http://b:2#slots=0"),
                    ("--max-concurrent", "0"), ("--max-concurrent", "many"), ("--user", "a b"),
                    ("--tunnel-token", "x;rm -rf /")):
            result = self.run_install("--non-interactive", "--no-start", "--dir", target, *bad)
            self.assertNotEqual(result.returncode, 0, bad)
            self.assertIn("install.sh: invalid" if bad[0] != "--tunnel-token" else "unexpected", result.stderr)
        self.assertFalse(os.path.exists(os.path.join(target, ".env")))
