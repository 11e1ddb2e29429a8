"""The C{llmgw-keys} tool: its commands on a users file, and a running gateway picking up its changes."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import stat
import subprocess
import sys
from typing import Any

from support import ALICE, BOB, GatewayTestCase
from twisted.trial.unittest import SynchronousTestCase

from twisted_gw.admission import UserSettings
from twisted_gw.keys import main
from twisted_gw.web.users import UserSet, parse_users

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*argv: str) -> tuple[int, str, str]:
    """Run the tool in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def key_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:12]


class KeysTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = self.mktemp()  # its directory exists and holds nothing else

    def write(self, doc: Any) -> None:
        with open(self.path, "w") as f:
            json.dump(doc, f)

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            return f.read()

    def users(self) -> UserSet:
        return parse_users(self.read())

    def doc(self) -> Any:
        return json.loads(self.read())

    def keys(self, *argv: str) -> tuple[int, str, str]:
        return run("--users", self.path, *argv)

    def add(self, user: str) -> str:
        code, out, err = self.keys("add", user)
        self.assertEqual(code, 0, err)
        return out.strip()

    def assertFails(self, *argv: str, message: str) -> None:
        """The command exits 1 with C{message} on stderr and leaves the file's bytes as they were."""
        before = self.read()
        code, out, err = self.keys(*argv)
        self.assertEqual(code, 1)
        self.assertEqual(out, "")
        self.assertTrue(err.startswith("llmgw-keys: "), err)
        self.assertIn(message, err)
        self.assertEqual(self.read(), before)


class AddTests(KeysTestCase):
    def test_add_prints_the_key_once_and_stores_only_its_hash(self) -> None:
        code, out, err = self.keys("add", "carol")
        self.assertEqual(code, 0)
        self.assertEqual(out.count("\n"), 1)
        key = out.strip()
        self.assertTrue(key.startswith("sk-"))
        self.assertGreaterEqual(len(key), 3 + 43)  # 32 random bytes, base64url
        self.assertIn("only", err)
        self.assertNotIn(key, err)
        self.assertEqual(self.users().lookup(key), "carol")
        self.assertNotIn(key.encode(), self.read())
        self.assertEqual(self.doc(), {"users": {"carol": {
            "keys": ["sha256:" + hashlib.sha256(key.encode()).hexdigest()]}}})

    def test_new_file_is_private_and_pretty_printed(self) -> None:
        self.add("carol")
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        text = self.read().decode()
        self.assertEqual(text, json.dumps(json.loads(text), indent=2) + "\n")

    def test_each_add_is_a_new_key_and_the_old_ones_keep_working(self) -> None:
        first, second = self.add("carol"), self.add("carol")
        self.assertNotEqual(first, second)
        users = self.users()
        self.assertEqual((users.lookup(first), users.lookup(second)), ("carol", "carol"))

    def test_original_form_is_converted_and_its_plain_keys_keep_working(self) -> None:
        self.write({"sk-abc": "alice", "sk-xyz": "bob"})
        key = self.add("alice")
        users = self.users()
        self.assertEqual(users.lookup("sk-abc"), "alice")
        self.assertEqual(users.lookup("sk-xyz"), "bob")
        self.assertEqual(users.lookup(key), "alice")
        alice = self.doc()["users"]["alice"]["keys"]
        self.assertEqual(alice[0], "sk-abc")
        self.assertTrue(alice[1].startswith("sha256:"))

    def test_replacing_keeps_permissions_and_leaves_no_temporary_files(self) -> None:
        self.write({"sk-abc": "alice"})
        os.chmod(self.path, 0o640)
        inode = os.stat(self.path).st_ino
        self.add("carol")
        self.assertNotEqual(os.stat(self.path).st_ino, inode)  # a new file was renamed into place
        self.add("dave")
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o640)
        self.assertEqual(os.listdir(os.path.dirname(self.path)), [os.path.basename(self.path)])

    def test_a_result_the_gateway_would_refuse_is_not_written(self) -> None:
        self.write({"users": {"bob": {"keys": ["sk-bob"], "weight": 0}}})
        self.assertFails("add", "carol", message="user 'bob': field 'weight' must be a positive number")
        self.assertEqual(os.listdir(os.path.dirname(self.path)), [os.path.basename(self.path)])

    def test_unreadable_json_is_an_error(self) -> None:
        with open(self.path, "w") as f:
            f.write('{"sk-abc": ')
        self.assertFails("add", "carol", message="not valid JSON")

    def test_names_the_installer_would_refuse_are_refused(self) -> None:
        self.write({"users": {}})
        for name in ("bad name!", "", "a/b", "x" * 65, "caf\u00e9"):
            self.assertFails("add", name, message="invalid user name")
        for name in ("carol", "carol.smith@example.org", "ci_bot-2", "x" * 64):
            self.add(name)
        self.assertEqual(len(self.doc()["users"]), 4)

    def test_users_file_from_the_environment(self) -> None:
        self.patch(os, "environ", dict(os.environ, USERS_FILE=self.path))
        code, out, _ = run("add", "carol")
        self.assertEqual(code, 0)
        self.assertEqual(self.users().lookup(out.strip()), "carol")


class ListTests(KeysTestCase):
    def test_lists_ids_and_settings_never_keys(self) -> None:
        self.write({"users": {"alice": {"keys": ["sk-plain-alice"], "weight": 2, "tokens_per_day": 200000}}})
        key = self.add("carol")
        code, table, _ = self.keys("list")
        self.assertEqual(code, 0)
        code, raw, _ = self.keys("list", "--json")
        self.assertEqual(code, 0)
        for out in (table, raw):
            self.assertNotIn(key, out)
            self.assertNotIn("sk-plain-alice", out)
            self.assertNotIn(hashlib.sha256(key.encode()).hexdigest(), out)  # nor the full stored hash
            self.assertIn(key_id(key), out)
            self.assertIn(key_id("sk-plain-alice"), out)
        lines = table.splitlines()
        self.assertEqual(lines[0].split()[:3], ["USER", "KEYS", "WEIGHT"])
        self.assertEqual(lines[1].split()[:3], ["alice", key_id("sk-plain-alice"), "2"])
        self.assertIn("200000", lines[1])
        self.assertEqual(lines[2].split()[:3], ["carol", key_id(key), "1"])
        self.assertEqual(json.loads(raw), [
            {"user": "alice", "keys": [key_id("sk-plain-alice")], "weight": 2.0, "max_concurrent": None,
             "max_queued": None, "tokens_per_minute": None, "tokens_per_day": 200000},
            {"user": "carol", "keys": [key_id(key)], "weight": 1.0, "max_concurrent": None,
             "max_queued": None, "tokens_per_minute": None, "tokens_per_day": None},
        ])

    def test_original_form_is_listed_and_left_as_it_is(self) -> None:
        self.write({"sk-abc": "alice"})
        before = self.read()
        code, out, _ = self.keys("list", "--json")
        self.assertEqual(code, 0)
        self.assertEqual([(row["user"], row["keys"]) for row in json.loads(out)], [("alice", [key_id("sk-abc")])])
        self.assertEqual(self.read(), before)

    def test_missing_file_is_an_error_naming_it(self) -> None:
        code, out, err = self.keys("list")
        self.assertEqual((code, out), (1, ""))
        self.assertIn(f"no users file at {os.path.abspath(self.path)}", err)
        self.assertIn("USERS_FILE", err)
        self.assertFalse(os.path.exists(self.path))

    def test_empty_file_lists_nothing(self) -> None:
        self.write({"users": {}})
        self.assertEqual(self.keys("list", "--json")[:2], (0, "[]\n"))


class RevokeTests(KeysTestCase):
    def test_revoke_one_key_by_id_prefix(self) -> None:
        first, second = self.add("carol"), self.add("carol")
        code, out, err = self.keys("revoke", "carol", key_id(first)[:8].upper())
        self.assertEqual((code, out), (0, ""), err)
        users = self.users()
        self.assertIsNone(users.lookup(first))
        self.assertEqual(users.lookup(second), "carol")

    def test_revoke_a_plain_key(self) -> None:
        self.write({"sk-abc": "alice", "sk-def": "alice"})
        self.assertEqual(self.keys("revoke", "alice", key_id("sk-abc"))[0], 0)
        users = self.users()
        self.assertIsNone(users.lookup("sk-abc"))
        self.assertEqual(users.lookup("sk-def"), "alice")

    def test_revoke_all_keeps_the_user_and_its_settings(self) -> None:
        self.write({"users": {"carol": {"keys": ["sk-one", "sk-two"], "weight": 2}, "bob": {"keys": ["sk-bob"]}}})
        self.assertEqual(self.keys("revoke", "carol")[0], 0)
        users = self.users()
        self.assertEqual((users.lookup("sk-one"), users.lookup("sk-two"), users.lookup("sk-bob")),
                         (None, None, "bob"))
        self.assertEqual(self.doc()["users"]["carol"], {"keys": [], "weight": 2})

    def test_errors_change_nothing(self) -> None:
        digests = ["abcdef" + "0" * 58, "abcdef" + "1" * 58]
        self.write({"users": {"carol": {"keys": [f"sha256:{d}" for d in digests]}}})
        self.assertFails("revoke", "nobody", message="no user 'nobody'")
        self.assertFails("revoke", "nobody", "abcdef", message="no user 'nobody'")
        self.assertFails("revoke", "carol", "123456", message="no key of user 'carol' with id '123456'")
        self.assertFails("revoke", "carol", "abcdef", message="2 keys of user 'carol'")
        self.assertFails("revoke", "carol", "abcde", message="at least 6 hex digits")
        self.assertFails("revoke", "carol", "abcdeg", message="at least 6 hex digits")
        self.assertEqual(self.keys("revoke", "carol", "abcdef1")[0], 0)
        self.assertEqual(self.doc()["users"]["carol"]["keys"], [f"sha256:{digests[0]}"])


class RemoveTests(KeysTestCase):
    def test_remove_takes_the_user_its_keys_and_settings(self) -> None:
        self.write({"users": {"carol": {"keys": ["sk-one", "sk-two"], "weight": 2}, "bob": {"keys": ["sk-bob"]}}})
        code, out, err = self.keys("remove", "carol")
        self.assertEqual((code, out), (0, ""), err)
        self.assertIn("removed 'carol' and its 2 key(s)", err)
        self.assertEqual(self.doc(), {"users": {"bob": {"keys": ["sk-bob"]}}})
        users = self.users()
        self.assertEqual((users.lookup("sk-one"), users.lookup("sk-bob")), (None, "bob"))

    def test_remove_from_the_original_form(self) -> None:
        self.write({"sk-abc": "alice", "sk-def": "alice", "sk-xyz": "bob"})
        self.assertEqual(self.keys("remove", "alice")[0], 0)
        users = self.users()
        self.assertEqual((users.lookup("sk-abc"), users.lookup("sk-def"), users.lookup("sk-xyz")),
                         (None, None, "bob"))

    def test_removing_nobody_changes_nothing(self) -> None:
        self.write({"users": {"bob": {"keys": ["sk-bob"]}}})
        self.assertFails("remove", "nobody", message="no user 'nobody'")


class SetTests(KeysTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.write({"sk-bob": "bob"})

    def test_set_each_field_then_remove_it(self) -> None:
        values = {"weight": "2.5", "max_concurrent": "3", "max_queued": "0", "tokens_per_minute": "1000",
                  "tokens_per_day": "200000"}
        for field, value in values.items():
            self.assertEqual(self.keys("set", "bob", field, value)[0], 0)
        self.assertEqual(self.users().settings_of("bob"), UserSettings(2.5, 3, 0, 1000, 200000))
        self.assertEqual(self.users().lookup("sk-bob"), "bob")
        for field in values:
            self.assertEqual(self.keys("set", "bob", field, "none")[0], 0)
        self.assertEqual(self.users().settings_of("bob"), UserSettings())
        self.assertEqual(self.doc(), {"users": {"bob": {"keys": ["sk-bob"]}}})

    def test_whole_weight_is_stored_as_a_number(self) -> None:
        self.assertEqual(self.keys("set", "bob", "weight", "3")[0], 0)
        self.assertEqual(self.doc()["users"]["bob"]["weight"], 3)
        self.assertEqual(self.users().settings_of("bob").weight, 3.0)

    def test_invalid_values_change_nothing(self) -> None:
        self.assertEqual(self.keys("set", "bob", "max_queued", "5")[0], 0)
        cases = [
            ("weight", "0", "field 'weight' must be a positive number"),
            ("weight", "-1", "field 'weight' must be a positive number"),
            ("weight", "inf", "field 'weight' must be a positive number"),
            ("weight", "heavy", "'heavy' is not a number"),
            ("max_concurrent", "0", "field 'max_concurrent' must be a whole number >= 1"),
            ("max_concurrent", "1.5", "field 'max_concurrent' must be a whole number >= 1"),
            ("max_queued", "-1", "field 'max_queued' must be a whole number >= 0"),
            ("tokens_per_minute", "0", "field 'tokens_per_minute' must be a whole number >= 1"),
            ("tokens_per_day", "1e3", "field 'tokens_per_day' must be a whole number >= 1"),
        ]
        for field, value, message in cases:
            self.assertFails("set", "bob", field, value, message=message)
        self.assertFails("set", "nobody", "weight", "2", message="no user 'nobody'")
        self.assertEqual(self.users().settings_of("bob"), UserSettings(max_queued=5))

    def test_unknown_field_is_a_usage_error(self) -> None:
        before = self.read()
        with contextlib.redirect_stderr(io.StringIO()) as err:
            e = self.assertRaises(SystemExit, main, ["--users", self.path, "set", "bob", "colour", "blue"])
        self.assertEqual(e.code, 2)
        self.assertIn("invalid choice: 'colour'", err.getvalue())
        self.assertEqual(self.read(), before)


class ModuleTests(KeysTestCase):
    def test_runs_as_python_m(self) -> None:
        self.write({"sk-abc": "alice"})
        env = dict(os.environ, PYTHONPATH=ROOT)
        done = subprocess.run([sys.executable, "-m", "twisted_gw.keys", "--users", self.path, "list", "--json"],
                              capture_output=True, text=True, env=env, timeout=60, check=False)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(json.loads(done.stdout)[0]["keys"], [key_id("sk-abc")])
        done = subprocess.run([sys.executable, "-m", "twisted_gw.keys"], capture_output=True, text=True, env=env,
                              timeout=60, check=False)
        self.assertEqual(done.returncode, 2)
        self.assertIn("usage: llmgw-keys", done.stderr)


class RunningGatewayTests(GatewayTestCase):
    """A running gateway sees the tool's changes once it re-checks the file."""

    def keys(self, *argv: str) -> str:
        code, out, err = run("--users", self.users_path, *argv)
        self.assertEqual(code, 0, err)
        return out

    async def status(self, key: str) -> int:
        reply = await self.call("GET", "/v1/models", key=key)
        await reply.text()
        return reply.code

    async def test_added_key_works_and_revoked_key_is_refused(self) -> None:
        await self.start()
        carol = self.keys("add", "carol").strip()
        await self.gw.gateway.users.poll()
        reply = await self.call("GET", "/v1/models", key=carol)
        self.assertEqual(reply.code, 200)
        self.assertIn(b"fake-llama", await reply.text())
        self.assertEqual(await self.status(ALICE), 200)  # the original-form file was converted
        self.assertEqual(await self.status(BOB), 200)

        self.keys("revoke", "carol")
        await self.gw.gateway.users.poll()
        self.assertEqual(await self.status(carol), 401)
        self.assertEqual(await self.status(ALICE), 200)

    async def test_settings_reach_the_gateway(self) -> None:
        await self.start()
        self.assertEqual(self.gw.gateway.users.current.settings_of("bob").weight, 1.0)
        self.keys("set", "bob", "weight", "3")
        await self.gw.gateway.users.poll()
        self.assertEqual(self.gw.gateway.users.current.settings_of("bob").weight, 3.0)
        self.assertEqual(await self.status(BOB), 200)

    async def test_removed_user_is_refused(self) -> None:
        await self.start()
        self.assertEqual(await self.status(BOB), 200)
        self.keys("remove", "bob")
        await self.gw.gateway.users.poll()
        self.assertEqual(await self.status(BOB), 401)
        self.assertEqual(await self.status(ALICE), 200)
