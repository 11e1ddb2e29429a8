"""The prompt read from each API's body, for billing a request whose client left (no I/O)."""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from twisted_gw.apis.prompts import chat_messages, estimate_tokens, plain_texts


class PromptTests(SynchronousTestCase):
    def test_messages_system_blocks_and_content_parts(self) -> None:
        doc: Any = {"system": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}],
                    "messages": [{"role": "user", "content": [{"type": "text", "text": "one"},
                                                              {"type": "text", "text": "two"}]},
                                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                                                               "content": "42"}]}]}
        self.assertEqual(chat_messages(doc, "messages"), [
            {"role": "system", "content": "Be brief."},  # (llama.cpp runs system blocks together)
            {"role": "user", "content": "one\ntwo"},  # (and message parts one a line)
            {"role": "user", "content": "42"},
        ])

    def test_responses_input_forms(self) -> None:
        self.assertEqual(chat_messages({"instructions": "Be brief.", "input": "hi"}, "responses"),
                         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
        items: Any = [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
                      {"type": "function_call_output", "call_id": "c", "output": "sunny"}]
        self.assertEqual(chat_messages({"input": items}, "responses"),
                         [{"role": "user", "content": "hi"}, {"role": "tool", "content": "sunny"}])
        self.assertIsNone(chat_messages({"input": 3}, "responses"))

    def test_plain_texts(self) -> None:
        self.assertEqual(plain_texts({"prompt": "once"}, "completions"), ["once"])
        self.assertEqual(plain_texts({"input": ["a", "b"]}, "embeddings"), ["a", "b"])
        self.assertIsNone(plain_texts({"prompt": [1, 2, 3]}, "completions"))  # (token ids: not text)
        self.assertIsNone(plain_texts({"messages": []}, "chat"))

    def test_estimate_is_four_characters_a_token(self) -> None:
        chat = {"messages": [{"role": "user", "content": "x" * 36}]}
        self.assertEqual(estimate_tokens(chat, "chat"), 10)  # (36 + len("user")) / 4
        self.assertEqual(estimate_tokens({"prompt": "y" * 9}, "completions"), 3)
        self.assertEqual(estimate_tokens({}, "embeddings"), 0)
