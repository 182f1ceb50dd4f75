"""Tensor-parallel stages over real mpirun, against single-process mlx-lm.

A group of ranks sums each split product's partial sums in another order than one process
does, so its logits may differ from mlx-lm's in the last bits, and a token may differ where
the two best logits nearly tie. The rule (README, "Tensor parallel"): at every decode step
compared, every logit lies within TOLERANCE of mlx-lm's (exec/verify.py's tolerance: 256 eps of
the dtype times the row's largest |logit|), and the tokens are mlx-lm's up to the first step
where mlx-lm's own top-two margin is below twice that (after it, both sequences are right).
"""

import numpy as np
import pytest

from conftest import mlx_lm_prompt_ids, run_pipeline

PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"
N_TOKENS = 24
TOLERANCE_EPS = 256  # exec/verify.py TOLERANCE_EPS
EPS32 = float(np.finfo(np.float32).eps)


def reference(path, prompt_ids: list[int], n: int):
    """mlx-lm's greedy tokens and each step's logits (float32 [n, V]), one token a step."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    model, _ = load(str(path))
    cache = make_prompt_cache(model)
    logits = model(mx.array([prompt_ids]), cache=cache)[:, -1]
    rows, tokens = [], []
    for _ in range(n):
        row = np.array(logits[0].astype(mx.float32))
        rows.append(row)
        tokens.append(int(row.argmax()))
        logits = model(mx.array([[tokens[-1]]]), cache=cache)[:, -1]
    return tokens, np.stack(rows)


def tolerance(rows: np.ndarray) -> np.ndarray:
    return TOLERANCE_EPS * EPS32 * np.abs(rows).max(axis=-1)


def margins(rows: np.ndarray) -> np.ndarray:
    top2 = np.sort(rows, axis=-1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def check(np_, path, tmp_path, *extra):
    """Run one-shot greedy under mpirun with `extra` flags; compare with mlx-lm by the rule."""
    dump = tmp_path / "logits.npy"
    proc = run_pipeline(np_, "--model", str(path), "--prompt", PROMPT, "--no-chat", "--temp",
                        "0", "--max-tokens", str(N_TOKENS), "--ignore-eos", "--json", *extra,
                        env_extra={"PIPELINE_LOGITS_OUT": str(dump)})
    assert proc.returncode == 0, proc.stderr
    import json

    out = json.loads(proc.stdout.strip().splitlines()[-1])
    from mlx_lm import load

    ids = mlx_lm_prompt_ids(load(str(path))[1], PROMPT, False)  # mlx-lm tokenizes itself
    assert out["prompt_ids"] == ids
    expected, ref = reference(path, ids, N_TOKENS)
    same = next((i for i, m in enumerate(margins(ref)) if m <= 2 * tolerance(ref)[i]),
                N_TOKENS)
    assert out["tokens"][:same] == expected[:same]
    assert same >= N_TOKENS // 2, f"mlx-lm's margins are too small to test with ({same})"
    if "--no-prompt-lookup" in extra:  # plain steps: one row of logits per token
        ours = np.load(dump)
        assert ours.shape == (N_TOKENS, ref.shape[1])
        diff = np.abs(ours[:same] - ref[:same]).max(axis=-1)
        assert (diff <= tolerance(ref[:same])).all(), (diff / (EPS32 * np.abs(ref[:same]).max(-1)))
    return out, proc.stderr


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-qwen3-moe", "tiny-llama-6h"])
def test_two_ranks_one_tensor_parallel_stage(model_dir, tmp_path, arch):
    import mlx.core as mx

    path = model_dir(arch)
    out, err = check(2, path, tmp_path, "--tp", "2", "--no-prompt-lookup")
    assert "stages of [2] ranks" in err
    assert [r["layer_range"] for r in out["ranks"]] == [[0, 7], [0, 7]]
    # each rank holds half of every layer and of the vocabulary (norms and routers whole)
    total = sum(a.nbytes for a in mx.load(str(path / "model.safetensors")).values())
    for r in out["ranks"]:
        assert 0.45 < r["weight_bytes"] / total < 0.56, (r["weight_bytes"], total)


def test_three_ranks_one_group_of_three(model_dir, tmp_path):
    out, err = check(3, model_dir("tiny-llama-6h"), tmp_path, "--tp", "3", "--no-prompt-lookup")
    assert "stages of [3] ranks" in err


def test_four_ranks_two_stages_of_two(model_dir, tmp_path):
    out, err = check(4, model_dir("tiny-qwen3-moe"), tmp_path, "--tp", "2", "--no-prompt-lookup")
    assert "stages of [2, 2] ranks" in err
    ranges = [r["layer_range"] for r in out["ranks"]]
    assert ranges[0] == ranges[1] and ranges[2] == ranges[3]  # each group shares its stage's
    assert ranges[0][0] == 0 and ranges[0][1] == ranges[2][0] and ranges[2][1] == 7


def test_speculative_decoding_on_a_tensor_parallel_stage(model_dir, tmp_path):
    check(2, model_dir("tiny-llama"), tmp_path, "--tp", "2", "--num-draft-tokens", "4")


BATCH_PROMPTS = ["hello there", "The quick brown fox jumps over the lazy dog", "a",
                 "Once upon a time there was a small village", "what is the answer", "x y z"]


@pytest.mark.parametrize("np_, tp", [(2, 2), (4, 2)])
def test_micro_batches_through_tensor_parallel_stages(model_dir, tmp_path, np_, tp):
    """batch (micro-batches, batched caches, the group's vocabulary-parallel head) at --tp 2:
    each sequence follows mlx-lm's one-shot greedy tokens by the near-tie rule."""
    import json

    model = model_dir("tiny-qwen3-moe")
    n = 10
    # the last line starts with p1's prompt: each rank of a group copies its heads' share of
    # the prompt cache's entry
    prompts = BATCH_PROMPTS + [BATCH_PROMPTS[1] + " and again"]
    (tmp_path / "in.jsonl").write_text("".join(
        json.dumps({"id": f"p{i}", "prompt": p, "max_tokens": n}) + "\n"
        for i, p in enumerate(prompts)))
    out = tmp_path / "out.jsonl"
    proc = run_pipeline(np_, "batch", str(tmp_path / "in.jsonl"), "-o", str(out), "--model",
                        str(model), "--no-chat", "--ignore-eos", "--concurrency", "3",
                        "--prefill-chunk", "4", "--tp", str(tp))
    assert proc.returncode == 0, proc.stderr
    assert f"stages of [{', '.join([str(tp)] * (np_ // tp))}] ranks" in proc.stderr
    results = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    from mlx_lm import load

    _, tokenizer = load(str(model))
    for i, prompt in enumerate(prompts):
        ids = mlx_lm_prompt_ids(tokenizer, prompt, False, None)
        expected, ref = reference(model, ids, n)
        same = next((k for k, m in enumerate(margins(ref)) if m <= 2 * tolerance(ref)[k]), n)
        assert results[f"p{i}"]["completion_ids"][:same] == expected[:same], prompt
    assert results[f"p{len(BATCH_PROMPTS)}"]["cached_tokens"] >= 8


def test_repl_turns_reuse_the_cache_on_every_rank_of_a_group(model_dir):
    """Chat turns at 4 ranks as 2 stages of 2: the second turn keeps the first turn's cache
    (every rank of each group trims alike: a rank out of step would fail its all-reduces),
    /reset clears it on all of them."""
    script = "hello there\n/stats\nand a second line\n/stats\n/reset\nagain\n/stats\n/quit\n"
    proc = run_pipeline(4, "--model", str(model_dir("tiny-qwen2")), "--max-tokens", "8",
                        "--tp", "2", input=script, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert "stages of [2, 2] ranks" in proc.stderr
    stats = proc.stdout.split("prompt: ")[1:]
    assert len(stats) == 3
    assert "reused from cache" not in stats[0] and "reused from cache" in stats[1]
    assert "reused from cache" not in stats[2]


SHARDABLE = ["tiny-qwen2", "tiny-qwen3", "tiny-deepseek-v3", "tiny-glm4-moe", "tiny-gpt-oss"]


@pytest.mark.parametrize("arch", SHARDABLE)
def test_every_architecture_mlx_lm_can_shard(model_dir, tmp_path, arch):
    out, err = check(2, model_dir(arch), tmp_path, "--tp", "2", "--no-prompt-lookup")
    assert "stages of [2] ranks" in err


def test_a_group_the_model_cannot_split_is_refused_with_the_numbers(model_dir):
    # tiny-mistral has one KV head: no way to give each of 2 ranks whole KV heads
    proc = run_pipeline(2, "--model", str(model_dir("tiny-mistral")), "--prompt", "hi",
                        "--tp", "2")
    assert proc.returncode == 2, proc.stderr
    line = next(x for x in proc.stderr.splitlines() if x.startswith("pipeline: error:"))
    assert "1 KV head" in line and "--tp 2" in line, line


def test_without_mlx_mpi_tp_is_refused_and_the_default_is_a_pipeline(model_dir):
    env = {"PIPELINE_MLX_MPI": "0"}  # MPI left to mpi4py: no groups can be made
    path = str(model_dir("tiny-llama"))
    proc = run_pipeline(2, "--model", path, "--prompt", "hi", "--tp", "2", env_extra=env)
    assert proc.returncode == 2, proc.stderr
    assert ("pipeline: error: --tp 2: tensor parallelism is unavailable here: "
            "PIPELINE_MLX_MPI=0 is set") in proc.stderr
    proc = run_pipeline(2, "--model", path, "--prompt", "hi", "--max-tokens", "4",
                        env_extra=env)
    assert proc.returncode == 0, proc.stderr
    assert "stages of" not in proc.stderr  # one rank per stage
