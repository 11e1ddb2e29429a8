"""
Log observers.

    twistd --logger=twisted_gw.logs.json_stdout -n llmgw ...

prints one JSON object a line (Twisted's own event serialisation) for log
shippers; each access event carries user, method, path, status, queue_wait,
ttft, duration, prompt_tokens, completion_tokens and cancelled as fields.

Without C{--logger}, C{twistd -n llmgw} writes twistd's human-readable log to
standard output, as twistd would (L{text_observer}), but with each second's
timestamp made once: Twisted's observer makes it for every line, through a
time zone lookup and C{strftime}, a third of what an access line costs.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from typing import IO, Any, Optional

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    formatEventAsClassicLogText,
    formatTime,
    jsonFileLogObserver,
)
from twisted.python.components import Componentized

_LEVELS = frozenset(LogLevel.iterconstants())


class QuickLogger(Logger):
    """
    A L{Logger} whose L{emit} checks the level by a set lookup: Twisted's
    sorts the five levels for every event (C{LogLevel.iterconstants}), a
    seventh of what an access line costs.  The event is Twisted's, field for
    field; an unknown level is Twisted's to refuse.
    """

    def emit(self, level: LogLevel, format: Optional[str] = None, **kwargs: object) -> None:
        if level not in _LEVELS:
            super().emit(level, format, **kwargs)
            return
        event = kwargs
        event.update(log_logger=self, log_level=level, log_namespace=self.namespace, log_source=self.source,
                     log_format=format, log_time=time.time())
        if "log_trace" in event:
            event["log_trace"].append((self, self.observer))  # type: ignore[attr-defined]
        self.observer(event)


def json_stdout() -> FileLogObserver:
    """JSON lines on standard output."""
    return jsonFileLogObserver(sys.stdout, recordSeparator="")


class SecondStamp:
    """
    L{formatTime} with its default format (RFC 3339, to the second), made
    once for each second: every time within a second has the same text.
    """

    def __init__(self) -> None:
        self._second: Optional[int] = None
        self._text = ""

    def __call__(self, when: Optional[float]) -> str:
        if when is None:
            return formatTime(when)
        second = math.floor(when)
        if second != self._second:
            self._text = formatTime(when)
            self._second = second
        return self._text


def text_observer(out: IO[str]) -> FileLogObserver:
    """
    What twistd's C{textFileLogObserver(out)} writes, line for line: Twisted's
    classic text format, with the timestamp from L{SecondStamp}, and an
    event whose format has no fields (an access line) written directly.
    """
    stamp = SecondStamp()

    def format_event(event: LogEvent) -> Optional[str]:
        text = event.get("log_format")
        system = event.get("log_system")
        if (
            type(text) is str and text and type(system) is str
            and "{" not in text and "}" not in text
            and "log_failure" not in event and "log_flattened" not in event
        ):
            # (a format without fields is its own text, as an access line's is: what Twisted's classic
            # format makes of it, without its string.Formatter)
            return f"{stamp(event.get('log_time'))} [{system}] {text}".replace("\n", "\n\t") + "\n"
        return formatEventAsClassicLogText(event, formatTime=stamp)

    return FileLogObserver(out, format_event)


def twistd_observer(twistd_options: Optional[Mapping[str, Any]]) -> Optional[FileLogObserver]:
    """
    The observer for the log twistd would write to standard output (C{-n}
    without C{--logfile}, or with C{--logfile=-}), as L{text_observer};
    None wherever twistd's own choice is to stand: a log file, syslog, a
    C{--logger} factory, a daemon, or not run by twistd at all.
    """
    if twistd_options is None or twistd_options.get("logger") or twistd_options.get("syslog"):
        return None
    if not twistd_options.get("nodaemon") or (twistd_options.get("logfile") or "-") != "-":
        return None
    return text_observer(sys.stdout)


def offer_observer(application: object, observer: Optional[FileLogObserver]) -> None:
    """
    Give twistd's application C{observer} as its L{ILogObserver} component,
    the way a C{.tac} file sets one, unless it has one already: twistd then
    logs to it (a C{--logger} factory still comes first).
    """
    if observer is not None and isinstance(application, Componentized):
        if application.getComponent(ILogObserver, None) is None:
            application.setComponent(ILogObserver, observer)
