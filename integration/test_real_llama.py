"""
The gateway in front of a real llama.cpp server with a real model (Gemma 3 270M),
driven by the official OpenAI SDK.  Every assertion is on what the real server
reports: its own usage and timings, and its /slots.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from conftest import KEYS, Gateway, free_port, wait_for

from twisted_gw.testing import LlamaServer

ALICE = "sk-int-alice"
MESSAGES: Any = [{"role": "user", "content": "Count from one to ten in words."}]


def as_dict(model: Any) -> dict[str, Any]:
    """An SDK object as the JSON the server sent (extra fields such as timings included)."""
    return dict(model.to_dict())


def client(gateway: Gateway, key: str = ALICE) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=120)


def busy_slots(llama: str) -> list[dict[str, Any]]:
    return [s for s in httpx.get(llama + "/slots", timeout=5).json() if s.get("is_processing")]


def peak_busy_slots(servers: list[str], ask: Callable[[int], None], count: int) -> dict[str, int]:
    """Run C{ask(0)} .. C{ask(count - 1)} in threads while sampling each server's /slots: the most busy at once."""
    peaks = {url: 0 for url in servers}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for url in servers:
                peaks[url] = max(peaks[url], len(busy_slots(url)))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    done.set()
    watcher.join()
    return peaks


def wait_idle(llama: str, seconds: float = 10.0) -> float:
    """Seconds until no slot is processing."""
    start = time.monotonic()
    while busy_slots(llama):
        if time.monotonic() - start > seconds:
            raise AssertionError("llama.cpp slots still busy")
        time.sleep(0.02)
    return time.monotonic() - start


def test_counts_equal_llamacpp_own_numbers(llama: str, start_gateway: Any) -> None:
    gateway = start_gateway(llama)
    sdk = client(gateway)
    expected_prompt = expected_completion = 0

    chunks = [as_dict(c) for c in sdk.chat.completions.create(
        model="gemma", messages=MESSAGES, max_tokens=24, stream=True)]
    timings = chunks[-1]["timings"]
    expected_prompt += timings["prompt_n"] + timings["cache_n"]
    expected_completion += timings["predicted_n"]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])

    answer = as_dict(sdk.chat.completions.create(model="gemma", messages=MESSAGES, max_tokens=24))
    assert answer["object"] == "chat.completion"
    assert answer["usage"]["prompt_tokens"] == answer["timings"]["prompt_n"] + answer["timings"]["cache_n"]
    expected_prompt += answer["usage"]["prompt_tokens"]
    expected_completion += answer["usage"]["completion_tokens"]

    text_chunks = [as_dict(c) for c in sdk.completions.create(
        model="gemma", prompt="Once upon a time", max_tokens=16, stream=True)]
    usage = next(c["usage"] for c in reversed(text_chunks) if c.get("usage"))
    expected_prompt += usage["prompt_tokens"]
    expected_completion += usage["completion_tokens"]

    text = as_dict(sdk.completions.create(model="gemma", prompt="Once upon a time", max_tokens=16))
    expected_prompt += text["usage"]["prompt_tokens"]
    expected_completion += text["usage"]["completion_tokens"]

    alice = gateway.metrics()["users"]["alice"]
    assert alice["requests"] == 4
    assert (alice["prompt_tokens"], alice["completion_tokens"]) == (expected_prompt, expected_completion)


def test_non_stream_answer_matches_the_server_field_for_field(llama: str, start_gateway: Any) -> None:
    gateway = start_gateway(llama)
    body = {"messages": MESSAGES, "max_tokens": 16, "temperature": 0, "seed": 7}
    direct = httpx.post(llama + "/v1/chat/completions", json=body, timeout=120)
    via = httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=120,
                     headers={"Authorization": f"Bearer {ALICE}"})
    a, b = direct.json(), via.json()
    assert list(a) == list(b)  # same fields in the same order
    assert a["choices"] == b["choices"]
    assert list(a["usage"]) == list(b["usage"]) and list(a["timings"]) == list(b["timings"])
    assert a["usage"]["completion_tokens"] == b["usage"]["completion_tokens"]
    assert via.headers["content-type"] == direct.headers["content-type"]
    assert len(via.content) == int(via.headers["content-length"])


def test_include_usage_gives_exactly_one_usage_chunk(llama: str, start_gateway: Any) -> None:
    sdk = client(start_gateway(llama))
    asked = [as_dict(c) for c in sdk.chat.completions.create(
        model="gemma", messages=MESSAGES, max_tokens=8, stream=True, stream_options={"include_usage": True})]
    assert sum(1 for c in asked if c.get("usage")) == 1
    assert asked[-1]["choices"] == [] and asked[-1]["usage"]["completion_tokens"] > 0
    plain = [as_dict(c) for c in sdk.chat.completions.create(
        model="gemma", messages=MESSAGES, max_tokens=8, stream=True)]
    assert sum(1 for c in plain if c.get("usage")) == 0


def test_streaming_client_leaving_frees_the_slot_and_the_queue_moves(llama: str, start_gateway: Any) -> None:
    gateway = start_gateway(llama, "--max-concurrent", "1")
    headers = {"Authorization": f"Bearer {ALICE}"}
    long = {"messages": MESSAGES, "max_tokens": 600, "stream": True, "ignore_eos": True}
    second_done: list[Any] = []

    def second() -> None:
        second_done.append(client(gateway, "sk-int-bob").chat.completions.create(
            model="gemma", messages=MESSAGES, max_tokens=8))

    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=long, headers=headers, timeout=120) as r:
        lines = r.iter_lines()
        while "content" not in next(lines):
            pass
        assert len(busy_slots(llama)) == 1
        runner = threading.Thread(target=second)
        runner.start()
        while gateway.metrics()["queue"]["waiting"] < 1:
            time.sleep(0.02)
        closed_at = time.monotonic()
    # the first generation stops; the queued one starts and finishes
    runner.join(60)
    assert second_done and second_done[0].choices[0].message.content is not None
    assert time.monotonic() - closed_at < 60
    assert wait_idle(llama) < 10
    bob = gateway.metrics()["users"]["bob"]
    assert bob["requests"] == 1


class SlotWatcher:
    """Samples llama.cpp's /slots in a thread: was any slot busy while we watched?"""

    def __init__(self, llama: str) -> None:
        self.llama = llama
        self.seen_busy = False
        self.errors: list[Exception] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.seen_busy = self.seen_busy or bool(busy_slots(self.llama))
            except httpx.HTTPError as e:
                self.errors.append(e)
            time.sleep(0.05)

    def __enter__(self) -> SlotWatcher:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def test_slot_is_idle_within_a_second_of_a_client_leaving(llama: str, start_gateway: Any) -> None:
    """Streaming and non-streaming alike (the latter is sent upstream as a stream and assembled)."""
    gateway = start_gateway(llama)
    headers = {"Authorization": f"Bearer {ALICE}"}
    body = {"messages": MESSAGES, "max_tokens": 600, "ignore_eos": True}

    # a streaming client reads for 2 s, mid-generation, then closes its connection
    wait_idle(llama)
    with SlotWatcher(llama) as watcher, httpx.stream(
        "POST", gateway.url + "/v1/chat/completions", json={**body, "stream": True}, headers=headers, timeout=10
    ) as response:
        started = time.monotonic()
        for _ in response.iter_raw():
            if time.monotonic() - started > 2:
                break
        else:
            raise AssertionError("a 600-token generation finished within 2 s")
    assert watcher.seen_busy, "the generation ran while the client read"
    assert wait_idle(llama, seconds=5) < 1.0

    # a non-streaming client gives up after 2.5 s without an answer
    outcome: list[str] = []

    def give_up() -> None:
        try:
            httpx.post(gateway.url + "/v1/chat/completions", json=body, headers=headers, timeout=2.5)
            outcome.append("finished")
        except httpx.ReadTimeout:
            outcome.append("gave up")

    wait_idle(llama)
    with SlotWatcher(llama) as watcher:
        waiter = threading.Thread(target=give_up)
        waiter.start()
        waiter.join(30)
    assert outcome == ["gave up"]
    assert watcher.seen_busy, "the generation ran while the client waited"
    assert wait_idle(llama, seconds=5) < 1.0
    alice = gateway.metrics()["users"]["alice"]
    assert alice["cancelled"] == 2
    assert alice["completion_tokens"] < 2 * 600  # both generations were cut short


def test_max_concurrent_1_with_five_sdk_clients(llama: str, start_gateway: Any) -> None:
    gateway = start_gateway(llama, "--max-concurrent", "1")
    results: list[str] = []
    errors: list[BaseException] = []

    def ask(i: int) -> None:
        try:
            stream = client(gateway, list(KEYS)[i % 2]).chat.completions.create(
                model="gemma", messages=MESSAGES, max_tokens=20, stream=True)
            results.append("".join(c.choices[0].delta.content or "" for c in stream if c.choices))
        except BaseException as e:  # reported below
            errors.append(e)

    most = peak_busy_slots([llama], ask, 5)
    assert errors == []
    assert len(results) == 5 and all(results)
    assert most[llama] == 1
    metrics = gateway.metrics()
    assert metrics["totals"]["requests"] == 5
    assert metrics["latency"]["p95_response_time_s"] > metrics["latency"]["p50_response_time_s"]


def test_models_and_embeddings(llama: str, start_gateway: Any) -> None:
    sdk = client(start_gateway(llama))
    models = sdk.models.list()
    assert models.data and "gemma" in models.data[0].id
    try:
        sdk.embeddings.create(model="gemma", input="hello")
    except openai.APIStatusError as e:
        if e.status_code == 501:
            pytest.skip(f"the server was started without --embeddings: {e.message}")
        raise


def test_upstream_loading_and_down_are_reported(start_gateway: Any, tmp_path: Any) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    gateway = start_gateway(url)
    headers = {"Authorization": f"Bearer {ALICE}"}
    down = httpx.get(gateway.url + "/v1/models", headers=headers, timeout=10)
    assert down.status_code == 502 and down.json()["error"]["code"] == "upstream_unreachable"
    server = LlamaServer(port, str(tmp_path / "llama.log"))
    server.start(ready_within=None)  # (the gateway sees it load)
    seen: list[tuple[int, str]] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            r = httpx.get(gateway.url + "/v1/models", headers=headers, timeout=10)
            seen.append((r.status_code, r.text))
            if r.status_code == 200:
                break
            time.sleep(0.02)
        assert seen[-1][0] == 200
        for status, text in seen:
            assert status in (200, 502, 503), (status, text)
            error = json.loads(text).get("error") if status != 200 else {}
            assert error is not None
            if status == 503:
                assert "Loading" in error["message"]  # llama.cpp's own answer, passed through
            if status == 502:
                assert error["code"] == "upstream_unreachable"
        wait_for(gateway.url + "/health", lambda r: r.status_code == 200)
    finally:
        server.stop()


def test_two_servers_share_the_load_within_their_slots(llama: str, start_gateway: Any, tmp_path: Any) -> None:
    """A second llama-server with 1 slot next to the 2-slot one: places read from /props, work on both, none over."""
    port = free_port()
    second = f"http://127.0.0.1:{port}"
    server = LlamaServer(port, str(tmp_path / "second.log"), slots=1)
    try:
        server.start()
        gateway = start_gateway(f"{llama},{second}", "--upstream-check-interval", "0.5")
        deadline = time.monotonic() + 30
        while [u["state"] for u in gateway.metrics()["upstreams"]] != ["ok", "ok"]:
            assert time.monotonic() < deadline, gateway.metrics()["upstreams"]
            time.sleep(0.1)
        upstreams = gateway.metrics()["upstreams"]
        assert [(u["places"], u["places_from"]) for u in upstreams] == [(2, "props"), (1, "props")]
        assert gateway.metrics()["queue"]["max_concurrent"] == 3
        answers: list[str] = []

        def ask(i: int) -> None:
            reply = client(gateway).chat.completions.create(model="gemma", messages=MESSAGES, max_tokens=32)
            answers.append(reply.choices[0].message.content or "")

        peaks = peak_busy_slots([llama, second], ask, 6)
        assert len(answers) == 6 and all(answers)
        assert peaks[second] == 1 and 1 <= peaks[llama] <= 2, peaks  # both worked, neither over its slots
        served = {u["url"]: u for u in gateway.metrics()["upstreams"]}
        assert served[second]["active"] == served[llama]["active"] == 0
        models = httpx.get(gateway.url + "/v1/models", headers={"Authorization": f"Bearer {ALICE}"}, timeout=10)
        assert [m["id"] for m in models.json()["data"]] == [models.json()["data"][0]["id"]]  # one model, once
    finally:
        server.stop()
