"""Options, environment variables and defaults."""

from __future__ import annotations

from ipaddress import ip_network

from twisted.trial.unittest import SynchronousTestCase

from twisted_gw.config import Config, ConfigError, Options, UpstreamSpec, build_config
from twisted_gw.web.access import describe


def parse(argv: list[str], env: dict[str, str]) -> Config:
    options = Options()
    options.parseArgs = lambda *a: None  # type: ignore[method-assign]
    # parse without postOptions, which reads the process environment
    options.postOptions = lambda: None  # type: ignore[method-assign]
    options.parseOptions(argv)
    return build_config(options, env)


class ConfigTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        config = parse([], {})
        self.assertEqual(config, Config())
        self.assertEqual(config.listen, ("tcp:8000",))
        self.assertEqual(config.upstreams, (UpstreamSpec("http://127.0.0.1:8080"),))
        self.assertIsNone(config.max_concurrent)  # auto: llama.cpp's slots, else 1
        self.assertEqual(config.users_file, "users.json")

    def test_env_over_default_and_cli_over_env(self) -> None:
        env = {"UPSTREAM_URL": "http://127.0.0.1:9000/", "MAX_CONCURRENT": "4", "USERS_FILE": "/etc/u.json",
               "LISTEN": "tcp:1234 tcp:1235,tcp:1236", "QUEUE_EVENTS": "data"}
        config = parse([], env)
        self.assertEqual(config.upstreams, (UpstreamSpec("http://127.0.0.1:9000"),))
        self.assertEqual(config.max_concurrent, 4)
        self.assertEqual(config.users_file, "/etc/u.json")
        self.assertEqual(config.listen, ("tcp:1234", "tcp:1235", "tcp:1236"))
        self.assertEqual(config.queue_events, "data")
        config = parse(["--max-concurrent", "2", "--listen", "tcp:1", "--listen", "tcp:2:interface=127.0.0.1",
                        "--upstream", "https://127.0.0.1:8443/llm"], env)
        self.assertEqual(config.max_concurrent, 2)
        self.assertEqual(config.listen, ("tcp:1", "tcp:2:interface=127.0.0.1"))
        self.assertEqual(config.upstreams, (UpstreamSpec("https://127.0.0.1:8443/llm"),))

    def test_several_upstreams_with_their_own_slots(self) -> None:
        expected = (UpstreamSpec("http://127.0.0.1:9001", 4), UpstreamSpec("http://127.0.0.1:9002"),
                    UpstreamSpec("https://127.0.0.1:9003/v", 1))
        env = {"UPSTREAM_URL": "http://127.0.0.1:9001#slots=4, http://127.0.0.1:9002/,https://127.0.0.1:9003/v#slots=1"}
        self.assertEqual(parse([], env).upstreams, expected)
        argv = ["--upstream", "http://127.0.0.1:9001#slots=4", "--upstream", "http://127.0.0.1:9002",
                "--upstream", "https://127.0.0.1:9003/v/#slots=1"]
        self.assertEqual(parse(argv, {"UPSTREAM_URL": "http://127.0.0.1:1"}).upstreams, expected)
        self.assertEqual(parse(["--max-concurrent", "auto"], {"MAX_CONCURRENT": "3"}).max_concurrent, None)

    def test_invalid_values_say_what_is_wrong(self) -> None:
        cases = [
            (["--max-concurrent", "x"], {}, "whole number"),
            (["--max-concurrent", "0"], {}, "at least 1"),
            ([], {"MAX_CONCURRENT": "-3"}, "at least 1"),
            (["--upstream", "ftp://x"], {}, "http:// or https://"),
            (["--upstream", "http://"], {}, "with a host"),
            (["--upstream", "http://h:99999"], {}, "invalid port"),
            (["--upstream", "http://h:1?x=1"], {}, "must not carry a query"),
            (["--upstream", "http://h:1#weight=2"], {}, "the only option after '#' is slots=N"),
            (["--upstream", "http://h:1#slots=0"], {}, "upstream slots must be at least 1"),
            (["--upstream", "http://h:1#slots=two"], {}, "upstream slots must be a whole number"),
            ([], {"UPSTREAM_URL": "http://h:1, http://h:1/"}, "upstream given twice: http://h:1"),
            ([], {"UPSTREAM_URL": " , "}, "at least one URL"),
            (["--listen", "nonsense:1"], {}, "nonsense:1"),
            (["--queue-events", "loud"], {}, "comment"),
            (["--keepalive-interval", "0"], {}, "a positive number of seconds"),
            (["--upstream-check-interval", "-1"], {}, "0 or a positive number of seconds"),
            (["--idle-timeout", "inf"], {}, "a positive number of seconds"),
            (["--user-tokens-per-day", "-5"], {}, "0 (no limit) or more"),
            (["--metrics-allow", "192.168.1.0/24, lan"], {}, "metrics-allow: 'lan' is not a network"),
            ([], {"METRICS_ALLOW": "10.0.0.0/33"}, "'10.0.0.0/33' is not a network"),
            (["--state", "http://127.0.0.1:6379"], {}, "state: not a redis:// or rediss:// URL"),
            ([], {"STATE_URL": "redis://127.0.0.1:6379/x"}, "the database in 'redis://127.0.0.1:6379/x' is not"),
            (["--cluster", "two words"], {}, "cluster must be a name without spaces or braces"),
            (["--lease-timeout", "0"], {}, "a positive number of seconds"),
            (["--state-ca", "/nonexistent/ca.pem"], {}, "state-ca"),
        ]
        for argv, env, fragment in cases:
            with self.assertRaises(ConfigError) as caught:
                parse(argv, env)
            self.assertIn(fragment, str(caught.exception), argv)

    def test_metrics_allow_networks(self) -> None:
        self.assertEqual(parse([], {}).metrics_allow, (ip_network("127.0.0.0/8"), ip_network("::1/128")))
        config = parse([], {"METRICS_ALLOW": "loopback, 192.168.1.0/24 fd00::/8,10.0.0.9"})
        self.assertEqual(config.metrics_allow, (ip_network("127.0.0.0/8"), ip_network("::1/128"),
                                                ip_network("192.168.1.0/24"), ip_network("fd00::/8"),
                                                ip_network("10.0.0.9/32")))
        self.assertEqual(describe(config.metrics_allow), "loopback, 192.168.1.0/24, fd00::/8, 10.0.0.9/32")
        self.assertEqual(parse(["--metrics-allow", "none"], {"METRICS_ALLOW": "10.0.0.0/8"}).metrics_allow, ())
        self.assertEqual(describe(()), "no network")

    def test_zero_turns_off_checks_and_limits(self) -> None:
        config = parse(["--upstream-check-interval", "0", "--user-max-concurrent", "0"], {"USER_TOKENS_PER_DAY": "500"})
        self.assertEqual(config.upstream_check_interval, 0.0)
        self.assertIsNone(config.user_max_concurrent)
        self.assertEqual(config.user_tokens_per_day, 500)

    def test_post_options_turns_errors_into_one_line_exit(self) -> None:
        options = Options()
        with self.assertRaises(SystemExit) as caught:
            options.parseOptions(["--max-concurrent", "none"])
        self.assertEqual(str(caught.exception), "llmgw: error: max-concurrent must be a whole number, not 'none'")

    def test_a_shared_state_store(self) -> None:
        from twisted_gw.admission.store import StoreURL

        alone = parse([], {})
        self.assertEqual((alone.state, alone.cluster, alone.lease_timeout), ("", "llmgw", 10.0))
        config = parse(["--cluster", "team-a"], {"STATE_URL": "rediss://llmgw:p%40ss@cache.lan:6380/2",
                                                 "LEASE_TIMEOUT": "4"})
        self.assertEqual((config.cluster, config.lease_timeout), ("team-a", 4.0))
        self.assertEqual(StoreURL.parse(config.state), StoreURL("cache.lan", 6380, 2, "llmgw", "p@ss", True))
        self.assertEqual(StoreURL.parse("redis://h"), StoreURL("h", 6379, 0, None, None, False))
        self.assertEqual(parse(["--state", "redis://:secret@h:1/"], {}).state, "redis://:secret@h:1/")
        self.assertEqual(StoreURL.parse("redis://:secret@h:1/").password, "secret")
