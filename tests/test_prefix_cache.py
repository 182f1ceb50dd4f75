"""The prompt cache: rank 0's index alone (pure decisions), then the real engine and workers in
one process (tests/test_engine.py's in-process ring): a prompt that starts like an earlier
prompt and answer gets the oracle's greedy tokens while prefilling only the rest, at 1 rank
and at 3; every rank's store holds exactly the index's entries; caches that cannot be cut
back (a recurrent state, a wrapped sliding window) reuse only exact snapshots."""

from __future__ import annotations

import pytest

from conftest import reference_tokens
from pipeline.exec.engine import Engine, Sequence
from pipeline.exec.prefix import PrefixIndex
from pipeline.exec.sampling import SamplingParams
from pipeline.wire.protocol import Op
from test_engine import LocalNet, _driver


def kv_rule(keep: int, length: int) -> bool:  # plain KV caches: any cut is fine
    return True


def recurrent_rule(keep: int, length: int) -> bool:  # Stage.can_keep of a recurrent model
    return keep >= length


# -- the index alone -----------------------------------------------------------------------
def test_lookup_takes_the_longest_usable_prefix_and_leaves_the_last_token():
    index = PrefixIndex(10**6, kv_rule)
    assert index.lookup([1, 2, 3]) == (None, 0) and index.misses == 1
    a, b = index.new_id(), index.new_id()
    assert index.add(a, [1, 2, 3, 4, 5], 100) == []
    assert index.add(b, [1, 2, 9, 9], 100) == []
    entry, keep = index.lookup([1, 2, 3, 4, 7, 8])
    assert (entry.id, keep) == (a, 4)
    entry, keep = index.lookup([1, 2, 3, 4, 5])  # all cached, but the last must be computed
    assert (entry.id, keep) == (a, 4)
    assert index.lookup([7, 1, 2]) == (None, 0)
    assert (index.hits, index.misses, index.cached_tokens) == (2, 2, 8)


def test_a_recurrent_state_is_reused_only_as_an_exact_snapshot():
    index = PrefixIndex(10**6, recurrent_rule)
    a = index.new_id()
    index.add(a, [1, 2, 3, 4], 100)
    assert index.lookup([1, 2, 3, 9, 9]) == (None, 0)  # would need a cut: refused
    assert index.lookup([1, 2, 3, 4]) == (None, 0)  # the last token must be computed
    entry, keep = index.lookup([1, 2, 3, 4, 5])
    assert (entry.id, keep) == (a, 4)
    # a longer entry does not stand in for a shorter one it cannot be cut back to
    b = index.new_id()
    assert index.add(b, [1, 2, 3, 4, 5, 6], 100) == []
    assert index.covered([1, 2, 3, 4]) and not index.covered([1, 2, 3])


def test_lru_eviction_under_the_budget_spares_pinned_entries():
    index = PrefixIndex(250, kv_rule)
    ids = [index.new_id() for _ in range(4)]
    assert index.add(ids[0], [1, 1], 100) == []
    assert index.add(ids[1], [2, 2], 100) == []
    index.lookup([1, 1, 5])  # entry 0 is now the most recently used
    assert index.add(ids[2], [3, 3], 100) == [ids[1]]
    assert list(index.entries) == [ids[0], ids[2]] and index.bytes == 200
    index.pin(ids[0])  # a sequence is being opened from it
    assert index.add(ids[3], [4, 4], 100) == [ids[2]]
    assert index.evictions == 2 and index.bytes == 200
    assert index.add(index.new_id(), [5], 251) != []  # alone over the budget: not kept
    assert index.bytes == 200


def test_an_entry_replaces_the_prefixes_it_extends():
    index = PrefixIndex(10**6, kv_rule)
    a, b = index.new_id(), index.new_id()
    index.add(a, [1, 2, 3], 30)
    assert index.covered([1, 2]) and not index.covered([1, 2, 3, 4])
    assert index.add(b, [1, 2, 3, 4, 5], 50) == [a]
    assert list(index.entries) == [b] and index.bytes == 50 and index.evictions == 0


# -- the engine and workers, in process -----------------------------------------------------
SHARED = [5, 9, 12, 40, 7, 3, 22, 18, 11, 30, 2]


def _engine(net: LocalNet, budget: int = 2**30) -> Engine:
    engine = Engine(_driver(net), concurrency=2, prompt_cache_bytes=budget)
    net.engine_table = engine.table
    prefilled = engine.prefilled = {}  # sequence id -> prompt tokens prefilled
    prefill = engine.driver.prefill

    def counting(tokens, caches, mb=0):
        prefilled[mb] = prefilled.get(mb, 0) + len(tokens)
        prefill(tokens, caches, mb)

    engine.driver.prefill = counting
    return engine


def _run(engine: Engine, prompts: list[list[int]], n: int) -> list[Sequence]:
    seqs = [Sequence(id=i, prompt=p, sampling=SamplingParams(max_tokens=n, ignore_eos=True))
            for i, p in enumerate(prompts)]
    engine.prefilled.clear()
    engine.run(seqs, lambda s: None)
    return seqs


def _stores_match(net: LocalNet, engine: Engine) -> None:
    entries = set(engine.prefixes.entries)
    assert set(engine.table.store) == entries
    for w in net.workers[1:]:
        assert set(w.table.store) == entries


@pytest.mark.parametrize("split", [[7], [2, 3, 2]])
def test_a_cache_hit_gives_the_oracle_tokens_and_prefills_only_the_rest(model_dir, split):
    path = model_dir("tiny-llama")
    net = LocalNet(path, split)
    engine = _engine(net)
    (first,) = _run(engine, [SHARED + [60, 61]], 5)
    assert first.cached_tokens == 0 and first.tokens == reference_tokens(path, first.prompt, 5)
    _stores_match(net, engine)
    # a prompt that shares the first 8 tokens (its copy of the entry is cut back and written
    # over from there on), then the conversation's next turn, from the same entry whole
    other = SHARED[:8] + [70, 71, 72]
    turn2 = first.prompt + first.tokens + [44, 45, 46]
    seqs = _run(engine, [other, turn2], 4)
    for seq in seqs:
        assert seq.tokens == reference_tokens(path, seq.prompt, 4), seq.id
    assert [s.cached_tokens for s in seqs] == [8, len(first.prompt) + 4]
    sids = sorted(engine.prefilled)
    assert [engine.prefilled[sid] for sid in sids] == [
        len(s.prompt) - 1 - s.cached_tokens for s in seqs]
    assert engine.prefixes.hits == 2 and engine.prefixes.misses == 1
    _stores_match(net, engine)
    # the conversation's newest entry replaced the one it extends
    assert len(engine.prefixes.entries) == 2


def test_eviction_under_a_small_budget_drops_the_entry_on_every_rank(model_dir):
    path = model_dir("tiny-llama")
    net = LocalNet(path, [3, 4])
    engine = _engine(net)
    _run(engine, [SHARED], 3)
    one = engine.prefixes.bytes
    assert one > 0
    engine.prefixes.budget = int(one * 1.5)  # room for one such entry
    (unrelated,) = _run(engine, [[90, 91, 92, 93, 94, 95, 96, 97, 98, 99, 100]], 3)
    assert unrelated.cached_tokens == 0
    assert engine.prefixes.evictions == 1 and len(engine.prefixes.entries) == 1
    _stores_match(net, engine)
    (again,) = _run(engine, [SHARED + [1, 2]], 3)  # its entry is gone: prefilled whole
    assert again.cached_tokens == 0 and engine.prefilled[min(engine.prefilled)] == 12
    assert again.tokens == reference_tokens(path, again.prompt, 3)


@pytest.mark.parametrize("arch", ["tiny-qwen3-next", "tiny-gemma3"])
def test_caches_that_cannot_be_cut_reuse_only_exact_snapshots(model_dir, arch):
    """qwen3_next's linear attention keeps a recurrent state; tiny-gemma3's sliding windows
    (8 tokens) wrap within these prompts. A prompt that extends an earlier prompt and answer
    reuses them whole; one that shares only part of them is prefilled from the start."""
    path = model_dir(arch)
    net = LocalNet(path, [2, 3, 2])
    engine = _engine(net)
    (first,) = _run(engine, [SHARED], 4)
    turn2 = first.prompt + first.tokens + [44, 45]
    seqs = _run(engine, [turn2, SHARED[:8] + [70, 71, 72]], 4)
    for seq in [first, *seqs]:
        assert seq.tokens == reference_tokens(path, seq.prompt, 4), seq.id
    assert [s.cached_tokens for s in seqs] == [len(SHARED) + 3, 0]
    _stores_match(net, engine)


def test_a_shared_preamble_is_prefilled_once(model_dir):
    """Sequences admitted together: the first one's prompt is kept as soon as it is prefilled,
    so the next ones copy the preamble they share with it instead of prefilling it."""
    path = model_dir("tiny-llama")
    net = LocalNet(path, [3, 4])
    engine = _engine(net)
    preamble = SHARED + [33, 34, 35]
    seqs = _run(engine, [preamble + [1, 2], preamble + [7], preamble + [8, 9, 10]], 3)
    for seq in seqs:
        assert seq.tokens == reference_tokens(path, seq.prompt, 3), seq.id
    assert [s.cached_tokens for s in seqs] == [0, len(preamble), len(preamble)]
    assert sum(engine.prefilled.values()) == len(preamble) + 1 + 0 + 2
    _stores_match(net, engine)


def test_an_entry_larger_than_the_budget_is_not_even_copied(model_dir):
    net = LocalNet(model_dir("tiny-llama"), [3, 4])
    engine = _engine(net, budget=1024)  # less than one token's keys and values on 3 layers
    _run(engine, [SHARED, SHARED + [1]], 3)
    assert not any(e[1] == Op.SAVE for e in net.log)
    assert not engine.prefixes.entries and engine.prefixes.misses == 2
    _stores_match(net, engine)
