"""The dashboard page, in a real headless Chromium, against a gateway under load."""

from __future__ import annotations

import os
import shutil
from typing import Any, Optional

from support import ALICE, BOB, GatewayTestCase, chat_body, reactor, until
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from twisted_gw.testing import FakeLlama, start_gateway
from twisted_gw.web.access import parse_networks

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def missing_browser(chromium: Optional[str], driver: Optional[str]) -> Optional[str]:
    """Why the browser tests cannot run, naming what is missing; None when both are there."""
    missing = [what for what, path in (("Chromium (Debian package chromium)", chromium),
                                       ("chromedriver (Debian package chromium-driver)", driver)) if path is None]
    if not missing:
        return None
    verb = "is" if len(missing) == 1 else "are"
    return f"{' and '.join(missing)} {verb} not installed; .ci/run installs them as root"


def browser() -> Any:
    try:
        from selenium import webdriver
    except ImportError:
        raise SkipTest("selenium is not installed (pip install selenium)") from None
    why = missing_browser(CHROMIUM, CHROMEDRIVER)
    if why:
        raise SkipTest(why)
    options = webdriver.ChromeOptions()
    assert CHROMIUM is not None
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1200,1400"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))


async def open_dashboard(test: GatewayTestCase) -> Any:
    """A headless Chromium (closed after the test) showing the test's gateway's dashboard."""
    driver = await deferToThread(browser)
    test.addCleanup(lambda: deferToThread(driver.quit))
    await deferToThread(driver.get, test.gw.url + "/dashboard")
    return driver


class SkipMessageTests(SynchronousTestCase):
    def test_names_what_is_missing(self) -> None:
        self.assertIsNone(missing_browser("/usr/bin/chromium", "/usr/bin/chromedriver"))
        only_driver = missing_browser("/usr/bin/chromium", None)
        self.assertEqual(only_driver, "chromedriver (Debian package chromium-driver) is not installed; "
                                      ".ci/run installs them as root")
        only_browser = missing_browser(None, "/usr/bin/chromedriver")
        assert only_browser is not None
        self.assertTrue(only_browser.startswith("Chromium (Debian package chromium) is not installed"))
        both = missing_browser(None, None)
        assert both is not None
        self.assertIn("Chromium (Debian package chromium) and chromedriver", both)
        self.assertIn("are not installed", both)


class DashboardTests(GatewayTestCase):
    timeout = 90

    async def open_dashboard(self) -> Any:
        return await open_dashboard(self)

    async def test_page_is_served_self_contained(self) -> None:
        await self.start()
        for path in ("/", "/dashboard"):
            reply = await self.call("GET", path, key=None)
            self.assertEqual(reply.code, 200)
            self.assertEqual(reply.header("Content-Type"), b"text/html; charset=utf-8")
            page = await reply.text()
            self.assertIn(b'fetch("/metrics"', page)
            self.assertNotIn(b"http://", page)  # nothing from a CDN
            self.assertNotIn(b"https://", page)

    async def test_live_numbers_match_metrics(self) -> None:
        await self.start(fake=FakeLlama(reactor, manual=True, chunk_delay=0.0), max_concurrent=1)
        # some history: one finished request, one cancelled
        done = Deferred.fromCoroutine(self.chat(stream=True, key=BOB))
        self.fake.release(len(self.fake.reply))
        await (await done).text()
        gone = await self.chat(stream=True)
        gone.body.abort()
        await self.fake.generations[-1].ended
        # now under load: alice runs, bob and alice wait
        running = await self.chat(stream=True)
        self.fake.release(2)
        waiting = [await self.chat(stream=True, key=BOB), await self.chat(stream=True, key=ALICE)]
        await waiting[1].body.wait_for(b": queue position=2")

        driver = await self.open_dashboard()

        def read_page() -> dict[str, Any]:
            from selenium.webdriver.common.by import By
            from selenium.webdriver.support.ui import WebDriverWait

            WebDriverWait(driver, 20).until(
                lambda d: d.find_element(By.ID, "q-waiting").text == "2"
                and d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1"
            )
            cells = [[c.text for c in r.find_elements(By.TAG_NAME, "td")]
                     for r in driver.find_elements(By.CSS_SELECTOR, "#users tr")]
            return {
                "active": driver.find_element(By.ID, "q-active").text,
                "waiting": driver.find_element(By.ID, "q-waiting").text,
                "limit": driver.find_element(By.ID, "q-limit").text,
                "who": driver.find_element(By.ID, "q-who").text,
                "users": {row[0]: row[1:] for row in cells},
                "streams": [r.text for r in driver.find_elements(By.CSS_SELECTOR, "#streams tr")],
                "problems": [r.text for r in driver.find_elements(By.CSS_SELECTOR, "#problems tr")],
                "status": driver.find_element(By.ID, "status").text,
                "upstreams": driver.find_element(By.ID, "u-list").text,
            }

        shown = await deferToThread(read_page)
        metrics = await self.metrics()
        self.assertEqual(shown["active"], str(metrics["queue"]["active"]))
        self.assertEqual(shown["waiting"], str(metrics["queue"]["waiting"]))
        self.assertEqual(shown["limit"], str(metrics["queue"]["max_concurrent"]))
        self.assertEqual(shown["who"], "waiting: " + ", ".join(metrics["waiting_users"]))
        self.assertEqual(set(shown["users"]), set(metrics["users"]))
        for name, figures in metrics["users"].items():
            today = metrics["users_today"][name]
            expected = [today["requests"], today["prompt_tokens"], today["completion_tokens"], figures["requests"],
                        figures["prompt_tokens"], figures["completion_tokens"], figures["cancelled"]]
            self.assertEqual(shown["users"][name], [f"{n:,}" for n in expected], name)
        rate = metrics["upstreams"][0]["cache_hit_rate"]
        self.assertIsNotNone(rate)  # (the fake reports timings.cache_n)
        self.assertEqual(shown["upstreams"], f"{self.fake.url}: unknown, 1/1 busy, cache hits "
                                             f"{100 * rate:.0f}% of prompt tokens")
        self.assertEqual(len(shown["streams"]), 1)
        self.assertTrue(shown["streams"][0].startswith("alice /v1/chat/completions"), shown["streams"])
        self.assertTrue(any("cancelled" in p for p in shown["problems"]), shown["problems"])
        # it keeps updating without a reload
        before = shown["status"]
        await task.deferLater(reactor, 2.5, lambda: None)
        after = await deferToThread(lambda: driver.find_element("id", "status").text)
        self.assertNotEqual(before, after)
        path = os.path.abspath(self.mktemp()) + ".png"
        await deferToThread(driver.save_screenshot, path)
        self.assertGreater(os.path.getsize(path), 10_000)
        self.fake.release(3 * len(self.fake.reply))
        for reply in (running, *waiting):
            await reply.text()

    async def test_asks_for_the_metrics_token_once(self) -> None:
        await self.start(metrics_token="m-secret")
        driver = await self.open_dashboard()

        def log_in() -> tuple[str, str]:
            from selenium.webdriver.common.by import By
            from selenium.webdriver.support.ui import WebDriverWait

            WebDriverWait(driver, 20).until(lambda d: d.find_element(By.ID, "login").is_displayed())
            driver.find_element(By.ID, "token").send_keys("m-secret")
            driver.find_element(By.CSS_SELECTOR, "#token-form button").click()
            WebDriverWait(driver, 20).until(lambda d: d.find_element(By.ID, "board").is_displayed())
            kept = driver.execute_script("return sessionStorage.getItem('llmgw-metrics-token')")
            driver.refresh()  # the token is kept for the browser session: no second prompt
            WebDriverWait(driver, 20).until(lambda d: d.find_element(By.ID, "board").is_displayed())
            return kept, driver.find_element(By.ID, "q-limit").text

        kept, limit = await deferToThread(log_in)
        self.assertEqual(kept, "m-secret")
        self.assertEqual(limit, "1")

    async def test_says_what_access_it_needs(self) -> None:
        # a client the gateway does not trust by address, as a LAN browser would be by default
        await self.start(metrics_allow=parse_networks("10.0.0.0/8"))
        driver = await self.open_dashboard()

        def read() -> dict[str, Any]:
            from selenium.webdriver.common.by import By
            from selenium.webdriver.support.ui import WebDriverWait

            WebDriverWait(driver, 20).until(lambda d: d.find_element(By.ID, "access").is_displayed())
            return {
                "text": driver.find_element(By.ID, "access").text,
                "status": driver.find_element(By.ID, "status").text,
                "token_form": driver.find_element(By.ID, "login").is_displayed(),
                "board": driver.find_element(By.ID, "board").is_displayed(),
            }

        shown = await deferToThread(read)
        self.assertEqual(shown["status"], "no access")
        self.assertFalse(shown["token_form"])  # no token was configured: asking for one helps nobody
        self.assertFalse(shown["board"])
        for needed in ("--metrics-token", "METRICS_TOKEN", "--metrics-allow", "METRICS_ALLOW", "--public-metrics",
                       "not from 127.0.0.1", "10.0.0.0/8"):
            self.assertIn(needed, shown["text"])

    async def test_a_wrong_token_is_said_to_be_refused(self) -> None:
        await self.start(metrics_token="m-secret")
        driver = await self.open_dashboard()

        def try_wrong() -> tuple[str, str]:
            from selenium.webdriver.common.by import By
            from selenium.webdriver.support.ui import WebDriverWait

            WebDriverWait(driver, 20).until(lambda d: d.find_element(By.ID, "login").is_displayed())
            first = driver.find_element(By.ID, "login-why").text
            driver.find_element(By.ID, "token").send_keys("wrong")
            driver.find_element(By.CSS_SELECTOR, "#token-form button").click()
            WebDriverWait(driver, 20).until(lambda d: "refused" in d.find_element(By.ID, "login-why").text)
            return first, driver.find_element(By.ID, "login-why").text

        first, refused = await deferToThread(try_wrong)
        self.assertIn("--metrics-token (METRICS_TOKEN)", first)
        self.assertIn("That token was refused", refused)


class ClusterDashboardTests(GatewayTestCase):
    timeout = 90
    async def test_a_replica_shows_the_clusters_queue_and_its_own(self) -> None:
        from redis_support import cluster_name, redis_server

        redis = redis_server()
        self.addCleanup(redis.stop)
        await self.start(fake=FakeLlama(reactor, manual=True), max_concurrent=1, state=redis.url,
                         cluster=cluster_name())
        other = await start_gateway(reactor, self.config)
        self.addCleanup(other.stop)
        await until(lambda: self.gw.gateway.store.up and other.gateway.store.up)
        running = await self.chat(stream=True)  # (here)
        self.fake.release(1)
        waiting = await self.call("POST", "/v1/chat/completions", chat_body(True), key=BOB, url=other.url)
        await waiting.body.wait_for(b": queue position=1")
        await until(lambda: self.gw.gateway.store.waiting == 1, 3)  # (this replica's next word with the store)
        driver = await open_dashboard(self)

        def read_page() -> dict[str, str]:
            from selenium.webdriver.common.by import By
            from selenium.webdriver.support.ui import WebDriverWait

            WebDriverWait(driver, 20).until(lambda d: d.find_element(By.ID, "q-waiting").text == "1")
            return {name: driver.find_element(By.ID, f"q-{name}").text for name in ("active", "waiting", "replica")}

        shown = await deferToThread(read_page)
        self.assertEqual((shown["active"], shown["waiting"]), ("1", "1"))  # (the cluster's)
        self.assertEqual(shown["replica"], f"cluster {self.config.cluster}: 2 replicas, store up; "
                                           "this replica: 1 running, 0 waiting")
        self.fake.release(100)
        for reply in (running, waiting):
            await reply.text()
