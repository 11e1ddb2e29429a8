"""Cache-aware routing as pure logic: the prefix index and the choice between upstreams under load."""

from __future__ import annotations

import tracemalloc

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from twisted_gw.admission.prefix import BLOCK, ENTRY_BYTES, PrefixIndex, block_hashes
from twisted_gw.admission.routing import BALANCE, CACHE, LEAST_BUSY, Route, Router

texts = st.text(alphabet="abcdefgh ", min_size=0, max_size=20 * BLOCK)


class IndexTests(SynchronousTestCase):
    @given(texts, texts)
    @settings(max_examples=200)
    def test_a_match_is_the_common_prefix_in_whole_blocks(self, a: str, b: str) -> None:
        index = PrefixIndex(1 << 20)
        index.insert("A", block_hashes(a))
        common = 0
        for x, y in zip(a.encode(), b.encode(), strict=False):
            if x != y:
                break
            common += 1
        self.assertEqual(index.match("A", block_hashes(b)), common // BLOCK)
        self.assertEqual(index.match("B", block_hashes(b)), 0)  # (another upstream holds nothing)

    @given(st.lists(texts, min_size=1, max_size=30), st.integers(min_value=1, max_value=50))
    @settings(max_examples=100)
    def test_the_bound_holds_and_the_newest_survive(self, prompts: list[str], entries: int) -> None:
        index = PrefixIndex(entries * ENTRY_BYTES)
        for prompt in prompts:
            index.insert("A", block_hashes(prompt))
            self.assertLessEqual(len(index), entries)
        last = block_hashes(prompts[-1])
        if len(last) <= entries:
            self.assertEqual(index.match("A", last), len(last))

    def test_forget(self) -> None:
        index = PrefixIndex(1 << 20)
        hashes = block_hashes("x" * 10 * BLOCK)
        index.insert("A", hashes)
        index.insert("B", hashes)
        index.forget("A")
        self.assertEqual((index.match("A", hashes), index.match("B", hashes)), (0, 10))

    def test_entry_bytes_is_what_an_entry_costs(self) -> None:
        index = PrefixIndex(1 << 30)
        hashes = [block_hashes(f"{i:08d}" * BLOCK) for i in range(200)]
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for h in hashes:
            index.insert("A", h)
        used = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        self.assertLessEqual(used / len(index), ENTRY_BYTES)


def router(*places: int, **options: float) -> Router:
    r = Router([Route(name, slots=n) for name, n in zip("ABC", places, strict=False)],
               index=PrefixIndex(1 << 20))
    for name, value in options.items():
        setattr(r, name, value)
    return r


class ChoiceTests(SynchronousTestCase):
    def conversation(self, turns: int) -> list[tuple[int, ...]]:
        system = "You are a helpful assistant who knows a great deal. " * 30
        return [block_hashes(system + "".join(f"user says {i}. assistant answers {i}. " for i in range(t + 1)))
                for t in range(turns)]

    def test_a_conversation_sticks_to_its_upstream(self) -> None:
        r = router(1, 1)
        turns = self.conversation(4)
        first = r.choose(prompt=turns[0])
        assert first is not None
        self.assertEqual(r.decisions, {(first.name, LEAST_BUSY): 1})
        for prompt in turns[1:]:
            decision = r.decide(prompt=prompt)
            assert decision is not None
            self.assertEqual((decision.route, decision.reason), (first, CACHE))
            self.assertGreater(decision.share, 0.8)
            r.record(decision, prompt)
        self.assertEqual(r.decisions[(first.name, CACHE)], 3)
        self.assertEqual(r.shares[-1], 4)

    def test_new_conversations_spread(self) -> None:
        r = router(1, 1)
        a = r.choose(prompt=block_hashes("one conversation " * 100))
        b = r.choose(prompt=block_hashes("another conversation " * 100))
        self.assertNotEqual(a, b)

    def test_a_full_best_match_sheds_to_least_busy(self) -> None:
        r = router(1, 1)
        turns = self.conversation(2)
        holder = r.choose(prompt=turns[0])
        assert holder is not None
        holder.active = 1  # (busy with another request)
        decision = r.decide(prompt=turns[1])
        assert decision is not None
        self.assertEqual(decision.reason, BALANCE)
        self.assertNotEqual(decision.route, holder)

    def test_the_balance_gap(self) -> None:
        r = router(4, 4, balance_gap=0.5)
        turns = self.conversation(2)
        holder = r.choose(prompt=turns[0])
        assert holder is not None
        holder.active = 2  # 0.5 busy against 0: within the gap
        self.assertEqual(r.decide(prompt=turns[1]).reason, CACHE)  # type: ignore[union-attr]
        holder.active = 3  # 0.75 against 0: out of balance
        self.assertEqual(r.decide(prompt=turns[1]).reason, BALANCE)  # type: ignore[union-attr]

    def test_a_small_match_is_no_match(self) -> None:
        r = router(1, 1, min_match=0.3)
        shared = "x" * 2 * BLOCK
        holder = r.choose(prompt=block_hashes(shared + "a" * 10 * BLOCK))
        decision = r.decide(prompt=block_hashes(shared + "b" * 10 * BLOCK))
        assert decision is not None and holder is not None
        self.assertEqual(decision.reason, LEAST_BUSY)
        self.assertLess(decision.share, 0.3)

    def test_model_routing_comes_first(self) -> None:
        r = router(1, 1)
        r.routes[0].models, r.routes[1].models = frozenset({"m1"}), frozenset({"m2"})
        turns = self.conversation(2)
        self.assertEqual(r.choose("m1", prompt=turns[0]), r.routes[0])
        decision = r.decide("m2", prompt=turns[1])
        assert decision is not None
        self.assertEqual((decision.route, decision.reason), (r.routes[1], LEAST_BUSY))

    def test_a_restarted_upstream_is_forgotten(self) -> None:
        r = router(1, 1)
        turns = self.conversation(2)
        holder = r.choose(prompt=turns[0])
        assert holder is not None
        r.restarted(holder)
        self.assertEqual(r.decide(prompt=turns[1]).reason, LEAST_BUSY)  # type: ignore[union-attr]
