"""
Usage report from the ledger.

    llmgw-usage --db llmgw-usage.sqlite3 --since 2026-11-01 --by user
    llmgw-usage --by day --json
    llmgw-usage --by model --csv
    llmgw-usage --backup /backups/llmgw-usage.sqlite3

Reads the database read-only, so it can run while the gateway writes; C{--backup}
copies it with SQLite's online backup, a consistent copy taken while it runs.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import os
import sqlite3
import sys
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any, Optional

from twisted_gw.books.ledger import API_OF_ENDPOINT, ledger_enabled
from twisted_gw.books.postgres import is_postgres, redacted
from twisted_gw.config import USAGE_DB_DEFAULT

GROUPS = {
    "user": "user",
    "day": "date(finished_at, 'unixepoch')",
    "model": "coalesce(model, '')",
    "api": "api",
}
PROG = "llmgw-usage"
HEADERS = ("requests", "prompt_tokens", "completion_tokens", "total_tokens", "cancelled", "estimated")


def _epoch(text: str) -> float:
    try:
        day = datetime.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None
    return datetime.datetime(day.year, day.month, day.day, tzinfo=datetime.timezone.utc).timestamp()


# The day of a row on PostgreSQL (SQLite's is in GROUPS).
POSTGRES_DAY = "to_char(to_timestamp(finished_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD')"


def report(db_path: str, by: str, since: Optional[float] = None, until: Optional[float] = None) -> list[dict[str, Any]]:
    """Rows of totals grouped C{by} user, day (UTC), model or API, from a SQLite file or a PostgreSQL URL."""
    postgres = is_postgres(db_path)
    key = POSTGRES_DAY if postgres and by == "day" else '"user"' if by == "user" else GROUPS[by]
    mark = "%s" if postgres else "?"
    where, args = [], []
    if since is not None:
        where.append(f"finished_at >= {mark}")
        args.append(since)
    if until is not None:
        where.append(f"finished_at < {mark}")
        args.append(until)
    sql = (
        f"SELECT {key} AS k, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), SUM(cancelled), "
        f"SUM(CASE WHEN usage_source = 'estimate' THEN 1 ELSE 0 END) FROM requests "
        f"{'WHERE ' + ' AND '.join(where) if where else ''} GROUP BY k ORDER BY k"
    )
    if postgres:
        rows = _postgres_rows(db_path, sql, args)
    else:
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
        try:
            if by == "api" and "api" not in {c[1] for c in db.execute("PRAGMA table_info(requests)")}:
                # a ledger no gateway of this version has opened yet (it would have added the column)
                sql = sql.replace("SELECT api AS k", f"SELECT {API_OF_ENDPOINT} AS k")
            rows = db.execute(sql, args).fetchall()
        finally:
            db.close()
    return [
        {by: k, "requests": n, "prompt_tokens": int(p or 0), "completion_tokens": int(c or 0),
         "total_tokens": int((p or 0) + (c or 0)), "cancelled": int(x or 0), "estimated": int(e or 0)}
        for k, n, p, c, x, e in rows
    ]


def _postgres_rows(url: str, sql: str, args: list[float]) -> list[tuple[Any, ...]]:
    import psycopg  # (only with a PostgreSQL ledger: pip install 'llmgw[postgres]')

    with psycopg.connect(url, connect_timeout=10) as db:
        db.read_only = True
        return db.execute(sql, args).fetchall()


def render_table(rows: list[dict[str, Any]], by: str) -> str:
    columns = (by, *HEADERS)
    cells = [[str(row[c]) for c in columns] for row in rows]
    totals = [str(sum(row[c] for row in rows)) for c in HEADERS]
    cells.append(["total", *totals])
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        # the key column left-aligned, the numbers right-aligned
        pairs = enumerate(zip(values, widths, strict=True))
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in pairs)

    rule = "  ".join("-" * w for w in widths)
    lines = [line(columns), rule, *(line(r) for r in cells[:-1]), rule, line(cells[-1])]
    return "\n".join(lines) + "\n"


def render_csv(rows: list[dict[str, Any]], by: str) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=(by, *HEADERS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def backup(db_path: str, destination: str) -> None:
    """Copy the ledger to C{destination} with SQLite's online backup, written aside and then renamed into place."""
    folder = os.path.dirname(os.path.abspath(destination))
    fd, partial = tempfile.mkstemp(prefix=".llmgw-backup-", dir=folder)
    os.close(fd)
    source = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        copy = sqlite3.connect(partial)
        try:
            source.backup(copy)
            # a standalone file: no -wal beside it to carry along
            copy.execute("PRAGMA journal_mode=DELETE")
        finally:
            copy.close()
        os.replace(partial, destination)
    except BaseException:
        os.unlink(partial)
        raise
    finally:
        source.close()


def default_db(environ: Mapping[str, str]) -> str:
    """The gateway's ledger when C{--db} is not given: C{USAGE_DB}, else the gateway's own default."""
    return environ.get("USAGE_DB") or USAGE_DB_DEFAULT


def _print(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    if args.json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
    elif args.csv:
        sys.stdout.write(render_csv(rows, args.by))
    else:
        sys.stdout.write(render_table(rows, args.by))


def _main_postgres(args: argparse.Namespace, url: str) -> int:
    if args.backup:
        print(f"{PROG}: --backup is for a SQLite ledger; back PostgreSQL up with pg_dump", file=sys.stderr)
        return 1
    try:
        rows = report(url, args.by, args.since, args.until)
    except ImportError:
        print(f"{PROG}: a PostgreSQL ledger needs psycopg: pip install 'llmgw[postgres]'", file=sys.stderr)
        return 1
    except Exception as e:  # (psycopg's errors: unreachable, no such table, refused credentials)
        print(f"{PROG}: cannot read the ledger {redacted(url)}: {str(e).strip()}", file=sys.stderr)
        return 1
    _print(rows, args)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description="Usage report from the gateway's ledger.")
    parser.add_argument("--db", help=f"the ledger, a file or a postgresql:// URL: the gateway's --usage-db "
                                     f"[env: USAGE_DB] [default: {USAGE_DB_DEFAULT}, in the gateway's folder]")
    parser.add_argument("--since", type=_epoch, help="from this day (UTC, YYYY-MM-DD), inclusive")
    parser.add_argument("--until", type=_epoch, help="to this day (UTC, YYYY-MM-DD), exclusive")
    parser.add_argument("--by", choices=sorted(GROUPS), default="user")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print JSON")
    output.add_argument("--csv", action="store_true", help="print CSV")
    output.add_argument("--backup", metavar="DEST", help="instead of a report, copy the ledger to DEST (an online "
                                                          "backup: safe while the gateway writes)")
    args = parser.parse_args(argv)
    db = args.db or default_db(os.environ)
    if is_postgres(db):
        return _main_postgres(args, db)
    if not ledger_enabled(db):
        print(f"{PROG}: the gateway keeps no ledger (USAGE_DB={db!r}); give --db", file=sys.stderr)
        return 1
    if not os.path.isfile(db):
        where = "--db" if args.db else ("USAGE_DB" if os.environ.get("USAGE_DB") else "the default")
        print(f"{PROG}: no ledger at {os.path.abspath(db)} (from {where}); give --db with the gateway's "
              "--usage-db, or set USAGE_DB", file=sys.stderr)
        return 1
    if args.backup:
        try:
            backup(db, args.backup)
        except (sqlite3.Error, OSError) as e:
            print(f"{PROG}: cannot back up {os.path.abspath(db)} to {os.path.abspath(args.backup)}: {e}",
                  file=sys.stderr)
            return 1
        print(f"{PROG}: backed up {os.path.abspath(db)} to {os.path.abspath(args.backup)}", file=sys.stderr)
        return 0
    try:
        rows = report(db, args.by, args.since, args.until)
    except sqlite3.Error as e:
        print(f"{PROG}: cannot read the ledger {os.path.abspath(db)}: {e}", file=sys.stderr)
        return 1
    _print(rows, args)
    return 0
