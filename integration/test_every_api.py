"""
Every API llama-server serves, through the gateway, driven by the official SDKs (anthropic for Messages, openai
for Responses and embeddings): the user's counts in /metrics against what the real server reported, and the
prompt of a request whose client left mid-stream billed as the server counts it.

Each test prints a `COUNTS` line (run with `-s` to see them): the figures the closing note of the issue quotes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest
from conftest import Gateway, free_port

from twisted_gw.testing import LlamaServer

ALICE = "sk-int-alice"
BOB = "sk-int-bob"
SYSTEM = "You are a helpful assistant. Answer in one short sentence."
MESSAGES: Any = [{"role": "user", "content": "Name three colours of the rainbow."}]


def user(gateway: Gateway, name: str = "alice") -> dict[str, int]:
    found: dict[str, int] = gateway.metrics()["users"].get(name, {"prompt_tokens": 0, "completion_tokens": 0})
    return found


def delta(before: dict[str, int], after: dict[str, int]) -> tuple[int, int]:
    return (after["prompt_tokens"] - before["prompt_tokens"], after["completion_tokens"] - before["completion_tokens"])


def settled(gateway: Gateway, seconds: float = 20.0) -> None:
    """Until no request is in flight and every count is done (the books follow at once)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        queue = gateway.metrics()["queue"]
        if not queue["active"] and not queue["waiting"]:
            time.sleep(0.5)  # (a prompt being counted after its client left)
            return
        time.sleep(0.05)
    raise AssertionError("requests still in flight")


def counts(api: str, server: tuple[int, int], metrics: tuple[int, int]) -> None:
    print(f"\nCOUNTS {api}: server prompt={server[0]} completion={server[1]}; "
          f"/metrics prompt={metrics[0]} completion={metrics[1]}")


@pytest.fixture(scope="module")
def embedding_llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second llama-server with --embeddings (501 without it) and mean pooling (400 with none: not OpenAI's)."""
    server = LlamaServer(free_port(), str(tmp_path_factory.mktemp("llama-emb") / "llama.log"), slots=1,
                         extra=("--embeddings", "--pooling", "mean"))
    try:
        yield server.start()
    finally:
        server.stop()


def sdk(gateway: Gateway, key: str = ALICE) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.url, api_key=key, max_retries=0, timeout=120)


def oai(gateway: Gateway, key: str = ALICE) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=120)


def test_messages_create_stream_and_count_tokens(llama: str, start_gateway: Any) -> None:
    gateway = start_gateway(llama)
    before = user(gateway)
    message = sdk(gateway).messages.create(model="gemma", max_tokens=32, system=SYSTEM, messages=MESSAGES)
    server = (message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0), message.usage.output_tokens)
    settled(gateway)
    assert delta(before, user(gateway)) == server
    counts("messages", server, delta(before, user(gateway)))

    before = user(gateway)
    with sdk(gateway).messages.stream(model="gemma", max_tokens=32, system=SYSTEM, messages=MESSAGES) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text
    server = (final.usage.input_tokens + (final.usage.cache_read_input_tokens or 0), final.usage.output_tokens)
    settled(gateway)
    assert delta(before, user(gateway)) == server
    counts("messages stream", server, delta(before, user(gateway)))

    before = user(gateway)
    counted = sdk(gateway).messages.count_tokens(model="gemma", system=SYSTEM, messages=MESSAGES)
    assert counted.input_tokens == server[0]
    settled(gateway)
    assert delta(before, user(gateway)) == (0, 0)
    counts("count_tokens", (counted.input_tokens, 0), delta(before, user(gateway)))

    # Anthropic's header alone, and an error in Anthropic's shape
    answer = httpx.post(gateway.url + "/v1/messages", headers={"x-api-key": ALICE}, timeout=120,
                        json={"model": "gemma", "max_tokens": 8, "messages": MESSAGES})
    assert answer.status_code == 200, answer.text
    with pytest.raises(anthropic.AuthenticationError) as bad:
        sdk(gateway, "sk-wrong").messages.create(model="gemma", max_tokens=8, messages=MESSAGES)
    assert bad.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]


def test_responses_create_and_stream(llama: str, start_gateway: Any) -> None:
    gateway = start_gateway(llama)
    before = user(gateway)
    response = oai(gateway).responses.create(model="gemma", instructions=SYSTEM, input="Name three colours.",
                                             max_output_tokens=32)
    assert response.usage is not None
    server = (response.usage.input_tokens, response.usage.output_tokens)
    settled(gateway)
    assert delta(before, user(gateway)) == server
    counts("responses", server, delta(before, user(gateway)))

    before = user(gateway)
    usage: Any = None
    for event in oai(gateway).responses.create(model="gemma", input="Name three colours.", max_output_tokens=32,
                                               stream=True):
        if event.type == "response.completed":
            usage = event.response.usage
    assert usage is not None
    server = (usage.input_tokens, usage.output_tokens)
    settled(gateway)
    assert delta(before, user(gateway)) == server
    counts("responses stream", server, delta(before, user(gateway)))


def test_embeddings(embedding_llama: str, start_gateway: Any) -> None:
    gateway = start_gateway(embedding_llama)
    before = user(gateway)
    result = oai(gateway).embeddings.create(model="gemma", input=["the first text", "and a second one"])
    assert len(result.data) == 2 and len(result.data[0].embedding) > 10
    server = (result.usage.prompt_tokens, 0)
    settled(gateway)
    assert delta(before, user(gateway)) == server
    counts("embeddings", server, delta(before, user(gateway)))


BODIES: Any = {
    "chat": ("/v1/chat/completions", {"model": "gemma", "messages": [{"role": "system", "content": SYSTEM},
                                                                      *MESSAGES], "max_tokens": 200}),
    "messages": ("/v1/messages", {"model": "gemma", "system": SYSTEM, "messages": MESSAGES, "max_tokens": 200}),
    "responses": ("/v1/responses", {"model": "gemma", "instructions": SYSTEM, "input": MESSAGES[0]["content"],
                                    "max_output_tokens": 200}),
    "completions": ("/v1/completions", {"model": "gemma", "prompt": "Once upon a time, in a land far away,",
                                        "max_tokens": 200}),
}


def whole_prompt(gateway: Gateway, api: str) -> int:
    """The prompt tokens the server reports for the request run to its end (bob's)."""
    path, body = BODIES[api]
    before = user(gateway, "bob")
    answer = httpx.post(gateway.url + path, json=body, headers={"Authorization": f"Bearer {BOB}"}, timeout=120)
    assert answer.status_code == 200, answer.text
    settled(gateway)
    return delta(before, user(gateway, "bob"))[0]


@pytest.mark.parametrize("api", sorted(BODIES))
def test_a_client_leaving_mid_stream_pays_for_its_prompt(llama: str, start_gateway: Any, api: str) -> None:
    gateway = start_gateway(llama)
    expected = whole_prompt(gateway, api)
    path, body = BODIES[api]
    before = user(gateway)
    with httpx.stream("POST", gateway.url + path, json={**body, "stream": True}, timeout=120,
                      headers={"Authorization": f"Bearer {ALICE}"}) as answer:
        seen = 0
        for line in answer.iter_lines():
            if line.startswith("data:") and ('"text"' in line or '"content"' in line or '"delta":"' in line):
                seen += 1
                if seen == 3:
                    break  # leaves after three tokens
    settled(gateway)
    billed = delta(before, user(gateway))
    counts(f"{api} left after 3 tokens", (expected, 3), billed)
    assert billed[0] == expected
    assert 1 <= billed[1] <= 6
    rows = json.loads(httpx.get(gateway.url + "/metrics", timeout=10).text)["users"]["alice"]
    assert rows["cancelled"] >= 1
