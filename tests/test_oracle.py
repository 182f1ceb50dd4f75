"""The strongest check: pipeline greedy tokens == single-process mlx-lm's, over real mpirun.

mlx-lm is given the prompt text and tokenizes it itself (mlx_lm.load's tokenizer, its chat
template or not, as `mlx_lm.generate` does): the pipeline's prompt ids and generated ids must
both equal mlx-lm's.
"""

import mlx.core as mx
import pytest

from conftest import ARCHS, mlx_lm_oracle, run_json

PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"
SYSTEM = "You answer in one short sentence."
N_TOKENS = 24
LAYERS = 7  # every tiny preset: uneven over 2 and 3 ranks


def check(np_, path, *extra, chat=False, system=None, cast=None):
    flags = ["--chat" if chat else "--no-chat"] + (["--system", system] if system else [])
    out = run_json(np_, "--model", str(path), "--prompt", PROMPT, *flags, "--temp", "0",
                   "--max-tokens", str(N_TOKENS), "--ignore-eos", *extra)
    ids, expected = mlx_lm_oracle(path, PROMPT, N_TOKENS, chat=chat, system=system,
                                  dequantize="--dequantize" in extra, cast=cast)
    assert out["prompt_ids"] == ids
    assert out["tokens"] == expected
    assert len(set(expected)) > 3, "degenerate model output makes the oracle weak"
    ranges = [tuple(r["layer_range"]) for r in out["ranks"]]
    assert [r["rank"] for r in out["ranks"]] == list(range(max(np_, 1)))
    assert ranges[0][0] == 0 and ranges[-1][1] == LAYERS
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, no overlap
    return out


@pytest.mark.parametrize("np_", [1, 2, 3])
@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture(model_dir, arch, np_):
    check(np_, model_dir(arch))


@pytest.mark.parametrize("np_", [2, 3])
def test_an_architecture_nobody_listed(model_dir, np_):
    # olmo2 (q/k norms over whole projections, norms after each sublayer): no code here
    # names it; mlx-lm's own forward runs each rank's share.
    check(np_, model_dir("tiny-olmo2"))


def test_multimodal_checkpoint_runs_its_text_model(model_dir):
    # Gemma 3 layout: config with text_config, weights under language_model.
    check(2, model_dir("tiny-gemma3-vl"))


@pytest.mark.parametrize("arch", ["tiny-qwen3-moe", "tiny-qwen3-next"])
def test_quantized_moe_checkpoint(model_dir, arch):
    # 4-bit experts stacked in switch layers (8-bit routers); each rank reads its own.
    check(2, model_dir(arch, quantize_bits=4))


def test_without_mpirun(model_dir):
    check(0, model_dir("tiny-llama"))


def test_chat_template_and_system_prompt(model_dir):
    out = check(2, model_dir("tiny-qwen3"), chat=True, system=SYSTEM)
    assert len(out["prompt_ids"]) > 20  # the template's turns are there, not just the text


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


# 16-bit checkpoints as mlx-community publishes them: bfloat16, and 4-bit with bfloat16
# scales (mlx_lm.convert -q of a bfloat16 model). mlx-lm runs them in bfloat16.
SIXTEEN_BIT = {"bf16": dict(dtype="bfloat16"), "bf16-4bit": dict(dtype="bfloat16", quantize_bits=4)}


@pytest.mark.parametrize("np_", [1, 2])
@pytest.mark.parametrize("kind", sorted(SIXTEEN_BIT))
def test_checkpoint_dtype_gives_mlx_lm_tokens(model_dir, kind, np_):
    check(np_, model_dir("tiny-llama", **SIXTEEN_BIT[kind]), "--dtype", "checkpoint")


@pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the float32 default is the CPU's")
@pytest.mark.parametrize("kind", sorted(SIXTEEN_BIT))
def test_cpu_default_is_mlx_lm_in_float32(model_dir, kind):
    # What the faster default computes: mlx-lm's model with every float cast to float32
    # (tokens that may differ from mlx-lm's bfloat16 ones, see README "Same tokens as mlx-lm").
    check(2, model_dir("tiny-llama", **SIXTEEN_BIT[kind]), cast="float32")
