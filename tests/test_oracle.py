"""The strongest check: pipeline greedy tokens == single-process mlx-lm's, over real mpirun."""

import pytest

from conftest import ARCHS, reference_tokens, run_json

PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"
N_TOKENS = 24


def check(np_, path, *extra):
    out = run_json(np_, "--model", str(path), "--prompt", PROMPT, "--no-chat", "--temp", "0",
                   "--max-tokens", str(N_TOKENS), "--ignore-eos", *extra)
    expected = reference_tokens(path, out["prompt_ids"], N_TOKENS, "--dequantize" in extra)
    assert out["tokens"] == expected
    assert len(set(expected)) > 3, "degenerate model output makes the oracle weak"
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_on_two_ranks(model_dir, arch):
    out = check(2, model_dir(arch))
    assert [r["rank"] for r in out["ranks"]] == [0, 1]


@pytest.mark.parametrize("np_", [0, 1, 3])
def test_llama_on_one_and_three_ranks(model_dir, np_):
    out = check(np_, model_dir("tiny-llama"))  # 7 layers: uneven over 2 and 3 ranks
    ranges = [tuple(r["layer_range"]) for r in out["ranks"]]
    assert ranges[0][0] == 0 and ranges[-1][1] == 7 and len(ranges) == max(np_, 1)


@pytest.mark.parametrize("arch", ["tiny-gemma3", "tiny-qwen3"])
def test_three_ranks(model_dir, arch):
    check(3, model_dir(arch))


def test_forced_split(model_dir):
    out = check(3, model_dir("tiny-llama"), "--split", "1,5,1")
    assert [r["layer_range"] for r in out["ranks"]] == [[0, 1], [1, 6], [6, 7]]


def test_pipelined_prefill_chunks(model_dir):
    # 4-token chunks follow each other through the stages; the result must not change.
    check(2, model_dir("tiny-gemma3"), "--prefill-chunk", "4")


def test_quantized_checkpoint(model_dir):
    check(2, model_dir("tiny-llama", quantize_bits=4))


def test_dequantized_checkpoint(model_dir):
    check(2, model_dir("tiny-llama", quantize_bits=4), "--dequantize")


def test_sharded_checkpoint(model_dir):
    check(3, model_dir("tiny-qwen2", shards=2))
