"""The shared head: the last rank computes the logits of the vocabulary's first rows, rank 0
the rest (exec/head.py HeadSplit). Its parts must give exactly the tokens of the whole head."""

import json

import mlx.core as mx
import numpy as np
import pytest

from pipeline.exec.head import HeadSplit, combine_tops, greedy_rows, near_tie_tolerance, top_summary
from pipeline.model.load import load_stage, read_config, resident_bytes
from pipeline.model.stage import use_rows_first

from conftest import run_pipeline

pytestmark = pytest.mark.usefixtures("on_cpu")  # bitwise comparisons: the CPU's products


@pytest.mark.parametrize("arch, quantize", [("tiny-llama", None), ("tiny-mistral", None),
                                            ("tiny-gemma3", None), ("tiny-qwen2", 8)])
def test_head_rows_are_bitwise_columns_of_the_whole_head(model_dir, arch, quantize):
    """Rank 0's [cut, V) and the last rank's own rows [0, cut) (loaded with head_share_rows)
    equal the whole head's columns, at few rows (rows-first products) and at many."""
    path = model_dir(arch, **({"quantize_bits": quantize} if quantize else {}))
    config = read_config(path)
    layers = config["num_hidden_layers"]
    first = load_stage(path, config, (0, 1), with_head=True)
    vocab = first.head.weight.shape[0]
    share = vocab * 3 // 4
    last = load_stage(path, config, (layers - 1, layers), with_head=False, head_share_rows=share)
    assert last.head_share is not None and last.embed_tokens is None
    assert last.head.weight.shape[0] == share
    assert resident_bytes(last) > resident_bytes(
        load_stage(path, config, (layers - 1, layers), with_head=False))
    for rows_first in (False, True):
        if rows_first:
            use_rows_first(first), use_rows_first(last)
        for rows in (1, 5, 16, 300):
            h = mx.random.normal((rows, 3, config["hidden_size"]), key=mx.random.key(rows))
            whole = first.logits(h)
            hn = first.final_norm(h)
            assert mx.array_equal(last.final_norm(h), hn).item()
            for cut in (1, 128, share):
                mine = first.head_logits(hn, cut)
                theirs = last.head_logits(hn, 0, cut)
                assert mx.array_equal(mine, whole[:, cut:]).item(), (rows, cut)
                assert mx.array_equal(theirs, whole[:, :cut]).item(), (rows, cut)


@pytest.mark.parametrize("arch, quantize", [("tiny-llama", None), ("tiny-qwen2", 8)])
def test_head_in_pieces_equals_the_whole_head(model_dir, monkeypatch, arch, quantize):
    """With a `between` callback (the ring's progress) the head runs HEAD_PIECE_ROWS rows of
    the vocabulary at a time, calling it after each piece: same logits, bit for bit."""
    import pipeline.model.stage

    path = model_dir(arch, **({"quantize_bits": quantize} if quantize else {}))
    config = read_config(path)
    layers = config["num_hidden_layers"]
    first = load_stage(path, config, (0, 1), with_head=True)
    vocab = first.head.weight.shape[0]
    last = load_stage(path, config, (layers - 1, layers), with_head=False,
                      head_share_rows=vocab // 2)
    monkeypatch.setattr(pipeline.model.stage, "HEAD_PIECE_ROWS", 96)
    for rows_first in (False, True):
        if rows_first:
            use_rows_first(first), use_rows_first(last)
        h = mx.random.normal((16, 1, config["hidden_size"]), key=mx.random.key(3))
        whole = first.logits(h)
        calls = []
        assert mx.array_equal(first.logits(h, lambda: calls.append(1)), whole).item()
        assert len(calls) == -(-vocab // 96)
        hn = first.final_norm(h)
        for cut in (1, 200, vocab // 2):
            calls.clear()
            mine = first.head_logits(hn, cut, between=lambda: calls.append(1))
            assert mx.array_equal(mine, whole[:, cut:]).item(), cut
            assert len(calls) == (-(-(vocab - cut) // 96) if vocab - cut > 96 else 0)
            theirs = last.head_logits(hn, 0, cut, between=lambda: calls.append(1))
            assert mx.array_equal(theirs, whole[:, :cut]).item(), cut


def _combined(logits: mx.array, cut: int):
    vocab = logits.shape[-1]
    return combine_tops(top_summary(logits[:, :cut], vocab), top_summary(logits[:, cut:], vocab),
                        cut, near_tie_tolerance(logits.dtype, vocab))


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_combined_tops_equal_greedy_rows_of_the_whole_row(dtype):
    rng = np.random.default_rng(0)
    logits = mx.array(rng.normal(size=(64, 1000)) * 4, dtype=dtype)
    tokens, near = greedy_rows(logits)
    for cut in (1, 250, 500, 999):
        got_tokens, got_near = _combined(logits, cut)
        assert [t for t, n in zip(got_tokens, got_near) if not n] == \
               [t for t, n in zip(tokens, got_near) if not n]
        # never less careful than the whole row's test
        assert all(g or not n for g, n in zip(got_near, near))


def test_combined_tops_ties_and_near_ties_across_the_cut():
    row = np.zeros((4, 100), np.float32)
    row[0, [10, 70]] = 5.0  # exact tie across a cut at 50: the first index, and flagged
    row[1, 70] = 5.0
    row[1, 10] = 5.0 - 1e-6  # a near tie across the cut: flagged
    row[2, 70] = 5.0  # a clear winner beyond the cut
    row[2, 10] = 4.0
    row[3, 20], row[3, 21] = 5.0, 5.0  # a tie inside the first part
    tokens, near = _combined(mx.array(row), 50)
    assert tokens == [10, 70, 70, 20]
    assert near == [True, True, False, True]
    assert greedy_rows(mx.array(row))[0] == tokens


def test_head_split_evens_out_busy_time():
    split = HeadSplit(vocab=32000, max_rows=24000)
    assert split.cut == 16000
    per_row = 1e-6  # s per vocabulary row on rank 0
    # rank 0 is 4 ms slower: the cut moves up (to the last rank), by half the gap's rows
    for _ in range(HeadSplit.WINDOW):
        split.update(16000, 0.094, 0.090, per_row * 16000, 16000)
    assert split.cut == 17024 and split.moves == 1
    # steps still in flight with the old cut do not count
    for _ in range(HeadSplit.WINDOW):
        split.update(16000, 0.094, 0.090, per_row * 16000, 16000)
    assert split.cut == 17024
    # a balanced window inside the dead band leaves it; bounds hold
    for _ in range(HeadSplit.WINDOW):
        split.update(17024, 0.0901, 0.0900, per_row * 14976, 14976)
    assert split.cut == 17024
    for _ in range(20):
        for _ in range(HeadSplit.WINDOW):
            split.update(split.cut, 0.2, 0.0, per_row * 1000, 1000)
    assert split.cut == 24000
    for _ in range(20):
        for _ in range(HeadSplit.WINDOW):
            split.update(split.cut, 0.0, 0.2, per_row * 1000, 1000)
    assert split.cut == 0


def _batch(model, tmp_path, name, np_, *extra):
    records = [{"id": i, "prompt": p, "max_tokens": 8, **({"temperature": 0.9, "seed": i}
                                                         if i % 2 else {})}
               for i, p in enumerate(["hello there", "a b c", "the sky is", "once upon",
                                      "what is", "x", "in the end", "bye now"])]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / f"{name}.jsonl"
    proc = run_pipeline(np_, "batch", str(src), "-o", str(out), "--model", str(model),
                        "--no-chat", "--ignore-eos", "--concurrency", "6", "--verbose", *extra)
    assert proc.returncode == 0, proc.stderr
    return {r["id"]: r["completion"] for r in map(json.loads, out.read_text().splitlines())}, \
        proc.stderr


@pytest.mark.parametrize("np_, arch", [(2, "tiny-mistral"), (3, "tiny-llama")])
def test_batch_with_shared_head_equals_without(model_dir, tmp_path, np_, arch):
    """Greedy rows (summaries) and sampled rows (the last rank's logits) give the same
    completions whether the last rank shares the head or not, and as one rank gives."""
    model = model_dir(arch)
    shared, log = _batch(model, tmp_path, "shared", np_)
    assert "holds the head's first" in log
    alone, log = _batch(model, tmp_path, "alone", np_, "--no-share-head")
    assert "holds the head's first" not in log
    one, _ = _batch(model, tmp_path, "one", 1)
    assert shared == alone == one
