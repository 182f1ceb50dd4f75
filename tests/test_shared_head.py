"""The shared head: the last rank computes the logits of the vocabulary's first rows, rank 0
the rest (exec/head.py HeadSplit). Its parts must give exactly the tokens of the whole head."""

import json

import mlx.core as mx
import numpy as np
import pytest

from pipeline.exec.head import (LSE_DTYPES, TOP_K, HeadSplit, combine_tops, error_bound,
                                greedy_rows, merge_tolerance, part_lse, part_summary,
                                rounded_argmax)
from pipeline.exec.sampling import logprobs_of
from pipeline.model.load import load_stage, read_config, resident_bytes
from pipeline.host.rows_first import use_rows_first

from conftest import mlx_lm_oracle, run_pipeline

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
    """combine_tops over the summaries of logits[:, :cut] (the last rank's part, with its
    logsumexp when the logits are 16-bit) and logits[:, cut:] (rank 0's)."""
    vocab = logits.shape[-1]
    first = part_summary(logits[:, :cut], vocab, lse=logits.dtype in LSE_DTYPES)
    rest = part_summary(logits[:, cut:], vocab, lse=False)
    return combine_tops(first, rest, cut, logits.dtype, vocab,
                        lambda rows: part_lse(logits[mx.array(rows), cut:]))


def _mlx_lm_tokens(logits: mx.array) -> list[int]:
    return mx.argmax(logprobs_of(logits), axis=-1).tolist()


def _decided(tokens: list[int], exact: list[bool]) -> list[int]:
    return [t for t, e in zip(tokens, exact) if not e]


def _clustered(dtype, rows: int = 300, vocab: int = 4096) -> mx.array:
    """Rows whose greedy token rounding often moves: 2-6 logits a little above 0 (within
    half the merge tolerance of each other) at random places, all others below -0.5."""
    rng = np.random.default_rng(1)
    x = -0.5 - np.abs(rng.normal(size=(rows, vocab))) * 0.3
    spread = 0.5 * float(merge_tolerance(dtype, vocab, 0.0))
    for row in x:
        k = rng.integers(2, 7)
        row[rng.choice(vocab, k, replace=False)] = rng.uniform(0, spread, size=k)
    return mx.array(x.astype(np.float32)).astype(dtype)


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_combined_tops_equal_mlx_lm_tokens(dtype):
    """Every row combine_tops decides (and greedy_rows, on the whole row) has mlx-lm's greedy
    token, at every cut: on rows drawn at random, and on rows with clusters of near ties,
    where rounding after "- logsumexp" moves the token of about a quarter. 16-bit logits
    decide them all (the logsumexp pins down c); float32 sends no logsumexp and leaves its
    near ties (a few logits within 1e-6 of each other) to the exact path."""
    rng = np.random.default_rng(0)
    spread = mx.array(rng.normal(size=(64, 1000)) * 4, dtype=dtype)
    clustered = _clustered(dtype)
    assert sum(a != b for a, b in zip(_mlx_lm_tokens(clustered),
                                      mx.argmax(clustered, axis=-1).tolist())) > 50
    for logits in (spread, clustered):
        want, vocab = _mlx_lm_tokens(logits), logits.shape[-1]
        tokens, near = greedy_rows(logits)
        assert _decided(tokens, near) == _decided(want, near)
        for cut in (1, vocab // 4, vocab // 2, vocab - 1):
            tokens, exact = _combined(logits, cut)
            assert _decided(tokens, exact) == _decided(want, exact), cut
            assert not any(exact) or (dtype == mx.float32 and logits is clustered), cut


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_merge_tolerance_bounds_every_merge(dtype):
    """A logit whose log-probability rounds to the maximum's lies within merge_tolerance of
    the maximum (rows where such merges are common, and random ones)."""
    rng = np.random.default_rng(2)
    for logits in (_clustered(dtype), mx.array(rng.normal(size=(64, 4096)) * 4, dtype=dtype)):
        lp = np.array(logprobs_of(logits).astype(mx.float32))
        x = np.array(logits.astype(mx.float32), np.float64)
        top = x.max(axis=1)
        tol = merge_tolerance(dtype, x.shape[1], top)
        merged = lp == lp.max(axis=1, keepdims=True)
        assert np.all((top[:, None] - x)[merged] <= np.repeat(tol, merged.sum(axis=1)))


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_logsumexp_from_two_parts_within_error_bound(dtype):
    """The logsumexp assembled from two parts' float32 ones is within error_bound of the
    float32 one mlx computes over the whole row (before rounding it to the logits' dtype),
    at SmolLM2's vocabulary size, for flat and peaked rows."""
    rng = np.random.default_rng(3)
    vocab = 49152
    for scale in (0.1, 1.0, 4.0, 10.0):
        logits = mx.array(rng.normal(size=(16, vocab)) * scale, dtype=dtype)
        whole = np.array(mx.logsumexp(logits.astype(mx.float32), axis=-1), np.float64)
        for cut in (128, vocab // 2, vocab - 128):
            ours = np.logaddexp(part_lse(logits[:, :cut]), part_lse(logits[:, cut:]))
            bound = np.array([error_bound(vocab, v) for v in ours])
            assert np.all(np.abs(ours - whole) <= bound), (scale, cut)


def test_rounding_across_the_cut_picks_the_lower_index():
    """bfloat16, cut at 2048: the maximum 0.0625 at 3000 (rank 0's part) and 0.0625 - 2^-12
    at 10 (the last rank's), every other logit -0.5. x - c rounds both to -7.75, so mlx-lm
    picks 10, and combine_tops does too, without the exact path; 2^-5 lower, they stay
    apart and 3000 wins."""
    row = np.full((2, 4096), -0.5, np.float32)
    row[:, 3000] = 0.0625
    row[0, 10] = 0.0625 - 2**-12
    row[1, 10] = 0.0625 - 2**-5
    logits = mx.array(row).astype(mx.bfloat16)
    assert mx.argmax(logits, axis=-1).tolist() == [3000, 3000]
    assert _mlx_lm_tokens(logits) == [10, 3000]
    assert _combined(logits, 2048) == ([10, 3000], [False, False])


def test_rows_combine_tops_cannot_decide_take_the_exact_path():
    # more than TOP_K logits within the tolerance of the maximum, in the part that holds it
    row = np.full((2, 4096), -0.5, np.float32)
    row[0, : TOP_K + 1] = 0.0625 - 2**-12
    row[0, 3000] = 0.0625
    row[1, : TOP_K + 1] = 0.0  # ... but far below the maximum of the other part: decided
    row[1, 3000] = 1.0
    logits = mx.array(row).astype(mx.bfloat16)
    assert _combined(logits, 2048) == ([3000, 3000], [True, False])
    # c could be either of two values that round the near tie differently
    values, index = np.array([-3.5, -3.515625]), np.array([70, 10])
    assert rounded_argmax(values, index, 3.0, mx.bfloat16, 1000) == 10
    assert rounded_argmax(values, index, 3.015625, mx.bfloat16, 1000) == 70
    assert rounded_argmax(values, index, 3.0078125, mx.bfloat16, 1000) is None


def test_combined_tops_ties_and_near_ties_across_the_cut():
    """float32, cut at 50. Only a lower index can take the token from the first maximum."""
    row = np.zeros((5, 100), np.float32)
    row[0, [10, 70]] = 5.0  # exact tie across the cut: the first index
    row[1, 70] = 5.0
    row[1, 10] = 5.0 - 1e-6  # a near tie below the maximum's index: the exact path
    row[2, 70] = 5.0  # a clear winner beyond the cut
    row[2, 10] = 4.0
    row[3, 20], row[3, 21] = 5.0, 5.0  # a tie inside the first part
    row[4, 10] = 5.0
    row[4, 70] = 5.0 - 1e-6  # a near tie above the maximum's index: cannot win
    tokens, exact = _combined(mx.array(row), 50)
    assert tokens == [10, 70, 70, 20, 10]
    assert exact == [False, True, False, False, False]
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


BATCH_PROMPTS = ["hello there", "a b c", "the sky is", "once upon", "what is", "x", "in the end",
                 "bye now"]


def _batch(model, tmp_path, name, np_, *extra, sampled: bool = True):
    """{id: completion ids} of a batch of 8 lines of 8 tokens; `sampled`: odd ids sampled."""
    records = [{"id": i, "prompt": p, "max_tokens": 8, **({"temperature": 0.9, "seed": i}
                                                         if sampled and i % 2 else {})}
               for i, p in enumerate(BATCH_PROMPTS)]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / f"{name}.jsonl"
    proc = run_pipeline(np_, "batch", str(src), "-o", str(out), "--model", str(model),
                        "--no-chat", "--ignore-eos", "--concurrency", "6", "--verbose", *extra)
    assert proc.returncode == 0, proc.stderr
    return {r["id"]: r["completion_ids"] for r in map(json.loads, out.read_text().splitlines())}, \
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


def test_batch_with_shared_head_in_bfloat16_equals_mlx_lm(model_dir, tmp_path):
    """A bfloat16 checkpoint run as stored (--dtype checkpoint) on 2 ranks, every line
    greedy: each decode step comes back with a summary that carries the last rank's
    logsumexp. Every line equals mlx-lm's tokens, with and without sharing and on one rank."""
    model = model_dir("tiny-llama", dtype="bfloat16")
    args = ("--dtype", "checkpoint")
    shared, log = _batch(model, tmp_path, "shared", 2, *args, sampled=False)
    assert "holds the head's first" in log
    alone, _ = _batch(model, tmp_path, "alone", 2, *args, "--no-share-head", sampled=False)
    one, _ = _batch(model, tmp_path, "one", 1, *args, sampled=False)
    assert shared == alone == one
    for i, prompt in enumerate(BATCH_PROMPTS):
        assert shared[i] == mlx_lm_oracle(model, prompt, 8, chat=False)[1], i
