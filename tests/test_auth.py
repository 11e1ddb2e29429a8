"""Users file parsing, key lookup and reloading."""

from __future__ import annotations

import hashlib
import json
import os

from twisted.internet import task
from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase, TestCase

from twisted_gw.admission import UserSettings
from twisted_gw.web.users import UsersFile, UsersFileError, parse_users


def run_now(f, *args):  # type: ignore[no-untyped-def]
    """A stand-in for deferToThread that runs at once (the file work is the same)."""
    return succeed(f(*args))


class ParseTests(SynchronousTestCase):
    def test_original_format(self) -> None:
        users = parse_users(b'{"sk-abc123": "alice", "sk-xyz789": "bob"}')
        self.assertEqual(users.lookup("sk-abc123"), "alice")
        self.assertEqual(users.lookup("sk-xyz789"), "bob")
        self.assertIsNone(users.lookup("sk-abc12"))
        self.assertIsNone(users.lookup(""))
        self.assertEqual(users.users, {"alice", "bob"})

    def test_rich_format_with_hashed_keys(self) -> None:
        digest = hashlib.sha256(b"sk-hashed").hexdigest()
        doc = {"users": {"alice": {"keys": ["sk-plain", f"sha256:{digest}"], "weight": 2}}}
        users = parse_users(json.dumps(doc).encode())
        self.assertEqual(users.lookup("sk-plain"), "alice")
        self.assertEqual(users.lookup("sk-hashed"), "alice")
        self.assertIsNone(users.lookup(f"sha256:{digest}"))

    def test_settings(self) -> None:
        doc = {"users": {
            "alice": {"keys": ["sk-a"], "weight": 2, "max_concurrent": 1, "max_queued": 0,
                      "tokens_per_minute": 1000, "tokens_per_day": 200000},
            "bob": {"keys": ["sk-b"]},
        }}
        users = parse_users(json.dumps(doc).encode())
        self.assertEqual(users.settings_of("alice"), UserSettings(2.0, 1, 0, 1000, 200000))
        self.assertEqual(users.settings_of("bob"), UserSettings())
        self.assertEqual(users.settings_of("nobody"), UserSettings())

    def test_only_digests_are_kept(self) -> None:
        users = parse_users(b'{"sk-secret-value": "alice"}')
        self.assertNotIn(b"sk-secret-value", repr(users).encode())

    def test_errors_name_the_problem(self) -> None:
        cases = {
            b"{": "not valid JSON",
            b"[]": "top level",
            b'{"sk-a": 5}': "user name",
            b'{"users": {"al": {"keys": "sk-a"}}}': "user 'al': field 'keys' must be a list",
            b'{"users": {"al": {"keys": [], "weight": 0}}}': "user 'al': field 'weight' must be a positive number",
            b'{"users": {"al": {"keys": [], "max_concurrent": "2"}}}': "field 'max_concurrent' must be a whole",
            b'{"users": {"al": {"keys": [], "tokens_per_day": 1.5}}}': "field 'tokens_per_day'",
            b'{"users": {"al": {"keys": [], "colour": "red"}}}': "user 'al': unknown field 'colour'",
            b'{"users": {"al": {"keys": ["sha256:zz"]}}}': "not hex",
            b'{"users": {"al": {"keys": ["sk-1"]}, "bo": {"keys": ["sk-1"]}}}': "both",
        }
        for data, fragment in cases.items():
            with self.assertRaises(UsersFileError) as caught:
                parse_users(data)
            self.assertIn(fragment, str(caught.exception), data)


class WatchTests(TestCase):
    def setUp(self) -> None:
        self.path = self.mktemp()
        self.clock = task.Clock()

    def write(self, data: bytes) -> None:
        with open(self.path, "wb") as f:
            f.write(data)
        # a distinct mtime even on coarse filesystems
        st = os.stat(self.path)
        os.utime(self.path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))

    def test_missing_then_created_then_broken_then_fixed(self) -> None:
        watcher = UsersFile(self.path, self.clock, 2.0, run_in_thread=run_now)
        watcher.load_now()
        self.assertEqual(watcher.current.users, frozenset())
        self.write(b'{"sk-a": "alice"}')
        watcher.start()
        self.clock.advance(2)
        self.assertEqual(watcher.current.lookup("sk-a"), "alice")
        self.write(b'{"sk-b": ')
        self.clock.advance(2)
        self.assertEqual(watcher.current.lookup("sk-a"), "alice")
        self.write(b'{"sk-b": "bob"}')
        self.clock.advance(2)
        self.assertIsNone(watcher.current.lookup("sk-a"))
        self.assertEqual(watcher.current.lookup("sk-b"), "bob")
        os.remove(self.path)
        self.clock.advance(2)
        self.assertEqual(watcher.current.users, frozenset())
        watcher.stop()

    def test_change_is_detected_by_stat_not_by_reading(self) -> None:
        self.write(b'{"sk-a": "alice"}')
        watcher = UsersFile(self.path, self.clock, 2.0, run_in_thread=run_now)
        watcher.load_now()
        before = os.stat(self.path)
        # same size, same inode, same mtime: the watcher has no reason to read it
        with open(self.path, "r+b") as f:
            f.write(b'{"sk-b": "bobby"}')
        os.utime(self.path, ns=(before.st_atime_ns, before.st_mtime_ns))
        watcher.poll()
        self.assertEqual(watcher.current.lookup("sk-a"), "alice")
        # a new mtime makes it read
        self.write(b'{"sk-b": "bobby"}')
        watcher.poll()
        self.assertEqual(watcher.current.lookup("sk-b"), "bobby")

    async def test_poll_reads_in_a_thread(self) -> None:
        self.write(b'{"sk-a": "alice"}')
        watcher = UsersFile(self.path, self.clock)
        d: Deferred[None] = watcher.poll()
        await d
        self.assertEqual(watcher.current.lookup("sk-a"), "alice")
