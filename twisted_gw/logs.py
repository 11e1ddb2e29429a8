"""
Log observers.

    twistd --logger=twisted_gw.logs.json_stdout -n llmgw ...

prints one JSON object a line (Twisted's own event serialisation) for log
shippers; each access event carries user, method, path, status, queue_wait,
ttft, duration, prompt_tokens, completion_tokens and cancelled as fields.
Without C{--logger}, twistd writes its usual text log.
"""

from __future__ import annotations

import sys

from twisted.logger import FileLogObserver, jsonFileLogObserver


def json_stdout() -> FileLogObserver:
    """JSON lines on standard output."""
    return jsonFileLogObserver(sys.stdout, recordSeparator="")
