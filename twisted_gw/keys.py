"""
C{llmgw-keys}: manage the gateway's users file (API keys and per-user settings).

    llmgw-keys [--users PATH] add USER                 # prints a new key, once; stores only its hash
    llmgw-keys [--users PATH] list [--json]            # users, key ids and settings; never keys
    llmgw-keys [--users PATH] revoke USER [KEYID]      # one key (by id prefix) or all of them
    llmgw-keys [--users PATH] set USER FIELD VALUE     # VALUE "none" removes the field

A key id is the first 12 hex digits of the key's SHA-256 digest.  Any change
turns an original-form file (C{{"sk-...": "alice"}}) into the rich form,
keeping its plain keys, and is checked with L{parse_users} before the file is
atomically replaced, so a running gateway never reads a half-written file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import secrets
import stat
import sys
import tempfile
from collections.abc import Sequence
from typing import Any, Optional

import attrs

from twisted_gw.web.users import HASH_PREFIX, SETTING_FIELDS, UsersFileError, parse_settings, parse_users

PROG = "llmgw-keys"
ID_LENGTH = 12
MIN_ID_PREFIX = 6
# A user name: what docker/install.sh accepts too (it goes into logs, metrics labels and the ledger).
USER_NAME = re.compile(r"[A-Za-z0-9._@-]{1,64}")


class KeysError(Exception):
    """A command cannot be carried out; the message says why."""


def key_hex(entry: str) -> str:
    """The hex SHA-256 digest of a stored key entry (plain or C{sha256:}-hashed)."""
    if entry.startswith(HASH_PREFIX):
        return entry[len(HASH_PREFIX):].lower()
    return hashlib.sha256(entry.encode("utf-8")).hexdigest()


def load(path: str) -> dict[str, Any]:
    """The users file as a rich-form document (an original-form file is converted); a missing file is empty."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return {"users": {}}
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise KeysError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise KeysError(f"{path}: the top level must be a JSON object")
    if not isinstance(doc.get("users"), dict):
        users: dict[str, dict[str, Any]] = {}
        for key, user in doc.items():
            if not isinstance(user, str) or not user:
                raise KeysError(f"{path}: key {key[:6]!r}...: the user name must be a non-empty string")
            users.setdefault(user, {"keys": []})["keys"].append(key)
        doc = {"users": users}
    for user, entry in doc["users"].items():
        if not isinstance(entry, dict):
            raise KeysError(f"{path}: user {user!r}: settings must be an object")
        keys = entry.setdefault("keys", [])
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise KeysError(f"{path}: user {user!r}: field 'keys' must be a list of strings")
    return doc


def save(path: str, doc: dict[str, Any]) -> None:
    """Check C{doc} as the gateway would, then atomically replace the file with it."""
    text = json.dumps(doc, indent=2) + "\n"
    try:
        parse_users(text.encode("utf-8"))
    except UsersFileError as e:
        raise KeysError(f"not written, the result would be invalid: {e}") from None
    target = os.path.realpath(path)
    try:
        old: Optional[os.stat_result] = os.stat(target)
    except FileNotFoundError:
        old = None
    tmp = tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", dir=os.path.dirname(target), prefix=f".{os.path.basename(target)}.",
        suffix=".tmp", delete=False,
    )
    try:
        with tmp:
            tmp.write(text)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.chmod(tmp.name, stat.S_IMODE(old.st_mode) if old is not None else 0o600)
        new = os.stat(tmp.name)
        if old is not None and (new.st_uid, new.st_gid) != (old.st_uid, old.st_gid):
            # keep the owner, so the gateway's account can still read it (e.g. mode 0640, the gateway's group)
            os.chown(tmp.name, old.st_uid, old.st_gid)
        os.replace(tmp.name, target)
    except BaseException:
        os.unlink(tmp.name)
        raise


def user_entry(doc: dict[str, Any], user: str) -> dict[str, Any]:
    try:
        entry: dict[str, Any] = doc["users"][user]
    except KeyError:
        raise KeysError(f"no user {user!r}") from None
    return entry


def cmd_add(args: argparse.Namespace, doc: dict[str, Any]) -> None:
    if not USER_NAME.fullmatch(args.user):
        raise KeysError(f"invalid user name {args.user!r}: 1 to 64 letters, digits, '.', '_', '@' or '-'")
    key = "sk-" + secrets.token_urlsafe(32)
    doc["users"].setdefault(args.user, {}).setdefault("keys", []).append(
        HASH_PREFIX + hashlib.sha256(key.encode("utf-8")).hexdigest()
    )
    save(args.users, doc)
    print(key)
    print(f"{PROG}: new key {key_hex(key)[:ID_LENGTH]} for {args.user!r} stored in {args.users}; "
          "the key is shown only this once", file=sys.stderr)


def show(value: Optional[float]) -> str:
    if value is None:
        return "default"
    return str(int(value)) if float(value).is_integer() else str(value)


def cmd_list(args: argparse.Namespace, doc: dict[str, Any]) -> None:
    if not os.path.exists(args.users):
        raise KeysError(f"no users file at {os.path.abspath(args.users)} (give --users, or set USERS_FILE)")
    try:
        parsed = parse_users(json.dumps(doc).encode("utf-8"))
    except UsersFileError as e:
        raise KeysError(f"{args.users}: {e}") from None
    rows: list[dict[str, Any]] = []
    for user in sorted(doc["users"]):
        ids = list(dict.fromkeys(key_hex(k)[:ID_LENGTH] for k in doc["users"][user]["keys"]))
        rows.append({"user": user, "keys": ids, **attrs.asdict(parsed.settings_of(user))})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        print(f"{PROG}: no users in {args.users}", file=sys.stderr)
        return
    header = ["USER", "KEYS", *(f.upper() for f in SETTING_FIELDS)]
    table = [header] + [
        [row["user"], ",".join(row["keys"]) or "-", *(show(row[f]) for f in SETTING_FIELDS)]
        for row in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())


def cmd_revoke(args: argparse.Namespace, doc: dict[str, Any]) -> None:
    entry = user_entry(doc, args.user)
    keys: list[str] = entry["keys"]
    if args.keyid is None:
        entry["keys"] = []
    else:
        prefix = args.keyid.lower()
        if len(prefix) < MIN_ID_PREFIX or any(c not in "0123456789abcdef" for c in prefix):
            raise KeysError(f"key id {args.keyid!r} must be at least {MIN_ID_PREFIX} hex digits")
        matches = {key_hex(k) for k in keys if key_hex(k).startswith(prefix)}
        if len(matches) != 1:
            problem = "no key" if not matches else f"{len(matches)} keys"
            raise KeysError(f"{problem} of user {args.user!r} with id {args.keyid!r}")
        entry["keys"] = [k for k in keys if key_hex(k) not in matches]
    save(args.users, doc)
    print(f"{PROG}: revoked {len(keys) - len(entry['keys'])} key(s) of {args.user!r}", file=sys.stderr)


def cmd_remove(args: argparse.Namespace, doc: dict[str, Any]) -> None:
    entry = user_entry(doc, args.user)
    del doc["users"][args.user]
    save(args.users, doc)
    print(f"{PROG}: removed {args.user!r} and its {len(entry['keys'])} key(s)", file=sys.stderr)


def parse_value(text: str) -> Optional[float]:
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise KeysError(f"{text!r} is not a number (or 'none')") from None


def cmd_set(args: argparse.Namespace, doc: dict[str, Any]) -> None:
    entry = user_entry(doc, args.user)
    value = parse_value(args.value)
    if value is None:
        entry.pop(args.field, None)
    else:
        try:
            parse_settings(args.user, {args.field: value})
        except UsersFileError as e:
            raise KeysError(str(e)) from None
        entry[args.field] = value
    save(args.users, doc)
    print(f"{PROG}: {args.user!r}: {args.field} = {show(value)}", file=sys.stderr)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Manage the LLM gateway's users file (API keys and limits).")
    p.add_argument("--users", metavar="PATH", help="the users file (default: $USERS_FILE, else users.json)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add = sub.add_parser("add", help="make a new key for USER (created if missing); the key is printed once")
    add.add_argument("user")
    add.set_defaults(run=cmd_add)
    lst = sub.add_parser("list", help="users, their key ids and settings (never the keys)")
    lst.add_argument("--json", action="store_true", help="print JSON instead of a table")
    lst.set_defaults(run=cmd_list)
    revoke = sub.add_parser("revoke", help="remove one key of USER (by id prefix), or all of them")
    revoke.add_argument("user")
    revoke.add_argument("keyid", nargs="?", help=f"a key id as shown by list (at least {MIN_ID_PREFIX} hex digits)")
    revoke.set_defaults(run=cmd_revoke)
    remove = sub.add_parser("remove", help="remove USER, its keys and its settings")
    remove.add_argument("user")
    remove.set_defaults(run=cmd_remove)
    setp = sub.add_parser("set", help="set one of USER's settings; VALUE 'none' removes it")
    setp.add_argument("user")
    setp.add_argument("field", choices=list(SETTING_FIELDS))
    setp.add_argument("value")
    setp.set_defaults(run=cmd_set)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    if args.users is None:
        args.users = os.environ.get("USERS_FILE") or "users.json"
    try:
        args.run(args, load(args.users))
    except (KeysError, OSError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
