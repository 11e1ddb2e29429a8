"""
The gateway's text log observer (twisted_gw/logs.py) against twistd's own:
the same lines for every event, and given to twistd only where twistd would
have written its text log to standard output.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
import time
from typing import Any, cast

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.application.service import Application
from twisted.logger import ILogObserver, Logger, LogLevel, formatTime, textFileLogObserver
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from twisted_gw.logs import QuickLogger, SecondStamp, offer_observer, text_observer, twistd_observer
from twisted_gw.service import GatewayTop

# times: whole seconds and the instants around them
instants = st.one_of(
    st.integers(min_value=0, max_value=4_000_000_000).map(float),
    st.tuples(st.integers(min_value=0, max_value=4_000_000_000),
              st.sampled_from([1e-6, 0.25, 0.5, 0.999999])).map(lambda t: t[0] + t[1]),
    st.floats(min_value=0, max_value=4e9, allow_nan=False),
)


def failure() -> Failure:
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        return Failure()
    raise AssertionError("unreachable")


def events(draw_times: list[float], texts: list[str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, (when, text) in enumerate(zip(draw_times, texts, strict=False)):
        kind = i % 7
        if kind == 0:  # an access line as the proxy logs it: its own format, braces doubled, and a system
            out.append({"log_format": text.replace("{", "{{").replace("}", "}}"), "log_time": when,
                        "log_system": "llmgw.proxy#info", "log_level": LogLevel.info, "access": text})
        elif kind == 1:  # a Logger's event: a format with fields, a namespace and level for the system
            out.append({"log_format": "{user}: {error}", "user": text, "error": ValueError(text), "log_time": when,
                        "log_namespace": "llmgw.proxy", "log_level": LogLevel.warn})
        elif kind == 2:  # with a traceback
            out.append({"log_format": "unhandled error on {path}", "path": text, "log_failure": failure(),
                        "log_time": when, "log_namespace": "llmgw.web", "log_level": LogLevel.critical})
        elif kind == 3:  # no time
            out.append({"log_format": text, "log_namespace": "x", "log_level": LogLevel.info})
        elif kind == 4:  # lines within the text
            out.append({"log_format": "a\nb {t}", "t": text, "log_time": when, "log_system": "-"})
        elif kind == 5:  # a system that is not text, a format that is bytes
            out.append({"log_format": text.encode("utf-8", "replace"), "log_time": when, "log_system": i})
        else:  # nothing to say: no line at all
            out.append({"log_format": "", "log_time": when})
    return out


def written(observer_for: Any, evs: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    observer = observer_for(out)
    for event in evs:
        observer(dict(event))
    return out.getvalue()


class TextObserverTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(times=st.lists(instants, min_size=1, max_size=14), texts=st.lists(st.text(max_size=12), min_size=14,
                                                                          max_size=14))
    def test_writes_what_twisteds_text_observer_writes(self, times: list[float], texts: list[str]) -> None:
        evs = events(times + times[::-1], texts)  # forwards, then back again through the same seconds
        self.assertEqual(written(text_observer, evs), written(textFileLogObserver, evs))

    def test_in_another_time_zone(self) -> None:
        """Across a daylight-saving change, where the offset moves within the day."""
        if not os.path.exists("/usr/share/zoneinfo/America/New_York"):
            self.skipTest("no time zone data")
        old = os.environ.get("TZ")
        os.environ["TZ"] = "America/New_York"
        time.tzset()
        try:
            change = 1710054000.0  # 2024-03-10 07:00 UTC, 03:00 EDT
            times = [change + d for d in (-3601, -1.5, -1, -0.5, 0, 0.5, 1, 3600)]
            evs = events(times, ["x"] * len(times))
            self.assertEqual(written(text_observer, evs), written(textFileLogObserver, evs))
            self.assertIn("-0500 [", written(text_observer, evs[:1]))
            self.assertIn("-0400 [", written(text_observer, evs[-1:]))
        finally:
            if old is None:
                del os.environ["TZ"]
            else:
                os.environ["TZ"] = old
            time.tzset()

    def test_a_stamp_is_made_once_a_second(self) -> None:
        stamp = SecondStamp()
        made = stamp(100.2)
        self.assertEqual(made, formatTime(100.2))
        self.assertIs(stamp(100.9), made)  # the same text object: not made again
        self.assertEqual(stamp(101.0), formatTime(101.0))
        self.assertEqual(stamp(100.5), formatTime(100.5))  # back to an earlier second
        self.assertEqual(stamp(None), "-")


class QuickLoggerTests(SynchronousTestCase):
    """QuickLogger emits the event Twisted's Logger emits, for every level and for a level that is none."""

    def emitted(self, cls: type[Logger], level: Any, **kwargs: Any) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        logger = cls(namespace="llmgw.test", source=self, observer=cast(ILogObserver, events.append))
        before = time.time()
        logger.emit(level, "{a} and {b}", a=1, b="two", **kwargs)
        for event in events:
            self.assertIs(event.pop("log_logger"), logger)
            self.assertTrue(before <= event.pop("log_time") <= time.time())
        return events

    def test_the_same_event_as_twisteds(self) -> None:
        for level in LogLevel.iterconstants():
            quick = self.emitted(QuickLogger, level)
            self.assertEqual(quick, self.emitted(Logger, level))
            self.assertEqual(quick[0]["log_level"], level)
            self.assertEqual(quick[0]["log_namespace"], "llmgw.test")

    def test_a_trace_is_extended_as_twisted_does(self) -> None:
        quick = self.emitted(QuickLogger, LogLevel.info, log_trace=[])
        self.assertEqual(len(quick[0].pop("log_trace")), 1)
        twisted = self.emitted(Logger, LogLevel.info, log_trace=[])
        twisted[0].pop("log_trace")
        self.assertEqual(quick, twisted)

    def test_an_unknown_level_is_refused_as_twisted_refuses_it(self) -> None:
        quick = self.emitted(QuickLogger, "loud")
        twisted = self.emitted(Logger, "loud")
        self.assertEqual(len(quick), 1)
        self.assertEqual(quick[0]["log_level"], LogLevel.critical)
        self.assertIn("invalid log level", quick[0]["log_format"])
        self.assertEqual(quick[0]["invalidLevel"], twisted[0]["invalidLevel"])


class TwistdObserverTests(SynchronousTestCase):
    def test_only_for_twistds_text_log_on_standard_output(self) -> None:
        self.assertIsNotNone(twistd_observer({"nodaemon": True, "logfile": None}))
        self.assertIsNotNone(twistd_observer({"nodaemon": True, "logfile": "-"}))
        for options in [
            None,  # not run by twistd
            {"nodaemon": False, "logfile": None},  # a daemon: twistd.log
            {"nodaemon": False, "logfile": "-"},  # twistd refuses it
            {"nodaemon": True, "logfile": "gw.log"},  # a log file, rotated by twistd
            {"nodaemon": True, "logfile": None, "syslog": True},
            {"nodaemon": True, "logfile": None, "logger": "twisted_gw.logs.json_stdout"},
        ]:
            self.assertIsNone(twistd_observer(options), options)

    def test_offered_to_the_application_as_a_tac_file_would(self) -> None:
        top = GatewayTop()
        top.log_observer = text_observer(io.StringIO())
        application = Application("llmgw")
        top.setServiceParent(application)
        self.assertIs(application.getComponent(ILogObserver), top.log_observer)
        # one set already (by whoever made the application) stays
        other = Application("llmgw")
        mine = textFileLogObserver(io.StringIO())
        other.setComponent(ILogObserver, mine)
        offer_observer(other, text_observer(io.StringIO()))
        self.assertIs(other.getComponent(ILogObserver), mine)
        # none offered: none set
        bare = Application("llmgw")
        GatewayTop().setServiceParent(bare)
        self.assertIsNone(bare.getComponent(ILogObserver, None))

    def test_twistd_logs_to_it(self) -> None:
        """twistd's own logger (run in a child process: it takes over the process's logging) picks it."""
        script = textwrap.dedent("""
            from twisted.application.service import Application
            from twisted.scripts._twistd_unix import UnixAppLogger
            from twisted_gw.logs import twistd_observer
            from twisted_gw.service import GatewayTop

            options = {"nodaemon": True, "logfile": None}
            top = GatewayTop()
            top.log_observer = twistd_observer(options)
            application = Application("llmgw")
            top.setServiceParent(application)
            logger = UnixAppLogger(options)
            logger.start(application)
            print("picked:", logger._observer is top.log_observer)
            logger.stop()
        """)
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("picked: True", result.stdout)
        self.assertRegex(result.stdout, r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[[^\]]*\] twistd .* starting up")
