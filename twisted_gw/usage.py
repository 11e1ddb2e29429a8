"""
The usage report, run as a command (C{llmgw-usage}, or C{python -m twisted_gw.usage}):

    llmgw-usage --db llmgw-usage.sqlite3 --since 2026-11-01 --by user

The report itself is L{twisted_gw.books.report}.
"""

from __future__ import annotations

import sys

from twisted_gw.books.report import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
