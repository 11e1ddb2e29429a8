"""
API keys: the users file, parsed into a L{UserSet}, and a watcher that reloads it.

The file is the original gateway's C{{"sk-...": "alice"}}, or the richer form
C{{"users": {"alice": {"keys": ["sk-...", "sha256:<hex>"]}}}}.  Only SHA-256
digests of keys are kept in memory; a presented key is hashed and compared
against every digest with L{hmac.compare_digest}, so the time taken does not
depend on how much of a key matches.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Callable
from typing import Any, Optional

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from twisted_gw.admission.settings import UserSettings

log = Logger(namespace="llmgw.auth")

HASH_PREFIX = "sha256:"


class UsersFileError(ValueError):
    """The users file cannot be used; the message names what is wrong."""


def key_digest(key: str) -> bytes:
    """The SHA-256 digest under which a key is stored."""
    return hashlib.sha256(key.encode("utf-8")).digest()


# field name -> (type check, description) for the rich users file
SETTING_FIELDS: dict[str, tuple[Callable[[object], bool], str]] = {
    "weight": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1e6,
               "a positive number"),
    "max_concurrent": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a whole number >= 1"),
    "max_queued": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a whole number >= 0"),
    "tokens_per_minute": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                          "a whole number >= 1"),
    "tokens_per_day": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a whole number >= 1"),
}


def parse_settings(user: str, raw: dict[str, Any]) -> UserSettings:
    """A user's settings from the rich users file, each field checked."""
    values: dict[str, Any] = {}
    for field, value in raw.items():
        if field == "keys":
            continue
        if field not in SETTING_FIELDS:
            raise UsersFileError(f"user {user!r}: unknown field {field!r} (known: keys, {', '.join(SETTING_FIELDS)})")
        check, description = SETTING_FIELDS[field]
        if value is None:
            continue
        if not check(value):
            raise UsersFileError(f"user {user!r}: field {field!r} must be {description}, not {value!r}")
        values[field] = float(value) if field == "weight" else value
    return UserSettings(**values)


@attrs.frozen
class UserSet:
    """An immutable set of (key digest, user name) pairs, and each user's settings."""

    entries: tuple[tuple[bytes, str], ...] = ()
    settings: dict[str, UserSettings] = attrs.field(factory=dict, hash=False)

    def settings_of(self, user: str) -> UserSettings:
        return self.settings.get(user, UserSettings())

    @property
    def users(self) -> frozenset[str]:
        return frozenset(user for _, user in self.entries)

    def lookup(self, key: str) -> Optional[str]:
        """The user owning C{key}, or L{None}; constant time in the key's content."""
        digest = key_digest(key)
        found: Optional[str] = None
        for candidate, user in self.entries:
            if hmac.compare_digest(candidate, digest):
                found = user
        return found


def _parse_key(user: str, key: object) -> bytes:
    if not isinstance(key, str) or not key:
        raise UsersFileError(f"user {user!r}: keys must be non-empty strings")
    if key.startswith(HASH_PREFIX):
        try:
            digest = bytes.fromhex(key[len(HASH_PREFIX):])
        except ValueError:
            raise UsersFileError(f"user {user!r}: {HASH_PREFIX} key is not hex") from None
        if len(digest) != 32:
            raise UsersFileError(f"user {user!r}: {HASH_PREFIX} key must be 64 hex digits")
        return digest
    return key_digest(key)


def parse_users(data: bytes) -> UserSet:
    """Parse a users file's bytes; raise L{UsersFileError} saying what is wrong."""
    try:
        doc: Any = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise UsersFileError(f"not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise UsersFileError("the top level must be a JSON object")
    pairs: list[tuple[bytes, str]] = []
    settings_by_user: dict[str, UserSettings] = {}
    if isinstance(doc.get("users"), dict):
        for user, settings in doc["users"].items():
            if not user:
                raise UsersFileError("user names must not be empty")
            if not isinstance(settings, dict):
                raise UsersFileError(f"user {user!r}: settings must be an object")
            keys = settings.get("keys", [])
            if not isinstance(keys, list):
                raise UsersFileError(f"user {user!r}: field 'keys' must be a list")
            pairs.extend((_parse_key(user, k), user) for k in keys)
            settings_by_user[user] = parse_settings(user, settings)
    else:
        for key, user in doc.items():
            if not isinstance(user, str) or not user:
                raise UsersFileError(f"key {key[:6]!r}...: the user name must be a non-empty string")
            pairs.append((_parse_key(user, key), user))
    owners: dict[bytes, str] = {}
    for digest, user in pairs:
        if owners.setdefault(digest, user) != user:
            raise UsersFileError(f"one key is given to both {owners[digest]!r} and {user!r}")
    return UserSet(tuple(owners.items()), settings_by_user)


def _signature(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_mtime_ns, st.st_size, st.st_ino)


@attrs.define
class UsersFile:
    """
    Keeps L{current} in step with the users file.

    The file is stat'ed every C{interval} seconds in a thread, and read only when
    its modification time, size or inode changed.  A file that does not parse
    leaves the last good set in place and logs an error; a missing file means no
    users, with a warning.
    """

    path: str
    clock: IReactorTime
    interval: float = 2.0
    run_in_thread: Callable[..., Deferred[Any]] = deferToThread
    current: UserSet = UserSet()
    _seen: Optional[tuple[int, int, int]] = None
    _missing_logged: bool = False
    _loop: Optional[LoopingCall] = None

    def load_now(self) -> None:
        """Load the file synchronously; for startup only, never on a request."""
        self._apply(self._read_if_changed())

    def poll(self) -> Deferred[None]:
        """Check the file once (stat and read in a thread); fires when applied."""
        d = self.run_in_thread(self._read_if_changed)
        d.addCallback(self._apply)
        d.addErrback(lambda f: log.failure("checking users file {path}", f, path=self.path))
        return d

    def start(self) -> None:
        loop = LoopingCall(self.poll)
        loop.clock = self.clock
        loop.start(self.interval, now=False)
        self._loop = loop

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def _read_if_changed(self) -> Optional[tuple[str, object]]:
        try:
            sig = _signature(os.stat(self.path))
        except FileNotFoundError:
            if self._seen != (0, 0, 0):
                self._seen = (0, 0, 0)
                return ("missing", None)
            return None
        if sig == self._seen:
            return None
        with open(self.path, "rb") as f:
            data = f.read()
        self._seen = sig
        try:
            return ("loaded", parse_users(data))
        except UsersFileError as e:
            return ("invalid", str(e))

    def _apply(self, outcome: Optional[tuple[str, object]]) -> None:
        if outcome is None:
            return
        kind, value = outcome
        if kind == "loaded":
            assert isinstance(value, UserSet)
            self.current = value
            log.info(
                "users file {path} loaded: {count} users", path=self.path, count=len(value.users)
            )
        elif kind == "invalid":
            log.error(
                "users file {path} is invalid ({why}); keeping the last good set of {count} users",
                path=self.path, why=value, count=len(self.current.users),
            )
        else:
            self.current = UserSet()
            log.warn(
                "users file {path} does not exist: no user can authenticate until it does",
                path=self.path,
            )
