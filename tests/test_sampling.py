"""Sampling with temperature, top-p and min-p against mlx-lm, and seeds across commands.

One sampler serves one-shot, REPL, batch and serve: a sequence with seed S draws the tokens that
single-process mlx-lm draws after mx.random.seed(S) with make_sampler(temp, top_p, min_p).
On the tiny random models the distributions are wide, so a sampler that ignored the
temperature, top-p or the seed would give other tokens within a few steps.
"""

from __future__ import annotations

import json

import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_sampler

from conftest import run_json, run_pipeline
from helpers import NullTokenizer
from pipeline.exec.driver import Driver
from pipeline.exec.engine import Engine, Sequence
from pipeline.exec.sampling import Sampler, SamplingParams, logprobs_of
from pipeline.model.load import load_stage, read_config

SETTINGS = [(0.8, 1.0, 0.0), (1.0, 0.9, 0.0), (0.7, 1.0, 0.05), (1.3, 0.5, 0.02)]
PROMPT = [5, 9, 12, 40, 7, 3, 22, 18]


def mlx_lm_sampled(path, prompt: list[int], n: int, temp: float, top_p: float, min_p: float,
                   seed: int) -> list[int]:
    model, _ = load(str(path))
    mx.random.seed(seed)
    steps = generate_step(mx.array(prompt), model, max_tokens=n,
                          sampler=make_sampler(temp, top_p, min_p))
    return [int(t) for t, _ in steps]


@pytest.mark.parametrize("temp, top_p, min_p", SETTINGS)
def test_sampler_draws_mlx_lm_seeded_stream(temp, top_p, min_p):
    logprobs = logprobs_of(mx.random.normal((1, 64), key=mx.random.key(1)) * 2)
    mx.random.seed(11)
    reference = make_sampler(temp, top_p, min_p)
    expected = [reference(logprobs).item() for _ in range(30)]
    ours = Sampler(SamplingParams(temp=temp, top_p=top_p, min_p=min_p, seed=11))
    assert [ours(logprobs) for _ in range(30)] == expected
    other = Sampler(SamplingParams(temp=temp, top_p=top_p, min_p=min_p, seed=12))
    assert [other(logprobs) for _ in range(30)] != expected  # the seed matters


def _driver(path) -> Driver:
    config = read_config(path)
    stage = load_stage(path, config, (0, config["num_hidden_layers"]), with_head=True)
    return Driver(None, stage, NullTokenizer(), 0)


@pytest.mark.parametrize("temp, top_p, min_p", SETTINGS[:2])
def test_one_shot_with_seed_equals_mlx_lm(model_dir, temp, top_p, min_p):
    path = model_dir("tiny-llama")
    params = SamplingParams(temp=temp, top_p=top_p, min_p=min_p, seed=3, max_tokens=12,
                            ignore_eos=True)
    tokens = [t for t, _ in _driver(path).generate(PROMPT, params) if t >= 0]
    assert tokens == mlx_lm_sampled(path, PROMPT, 12, temp, top_p, min_p, 3)
    greedy = [t for t, _ in _driver(path).generate(PROMPT, SamplingParams(max_tokens=12))
              if t >= 0]
    assert tokens != greedy  # the temperature is applied


def test_batched_sequences_keep_their_own_seeded_streams(model_dir):
    """Sequences sampled together in micro-batches give each the tokens of a one-shot run
    with its seed (and of mlx-lm with that seed)."""
    path = model_dir("tiny-llama")
    driver = _driver(path)
    seeds = [1, 2, 3, 1]
    prompts = [PROMPT, PROMPT, PROMPT[:5], PROMPT]
    seqs = [Sequence(id=i, prompt=p, sampling=SamplingParams(temp=0.9, top_p=0.95, seed=s,
                                                             max_tokens=8, ignore_eos=True))
            for i, (p, s) in enumerate(zip(prompts, seeds))]
    done = {}
    Engine(driver, concurrency=4).run(seqs, lambda s: done.__setitem__(s.id, s.tokens))
    for i, (p, s) in enumerate(zip(prompts, seeds)):
        assert done[i] == mlx_lm_sampled(path, p, 8, 0.9, 0.95, 0.0, s), i
    assert done[0] == done[3] and done[0] != done[1]


def test_one_shot_seed_over_two_ranks_equals_mlx_lm(model_dir):
    """Through mpirun: the CLI's --temp/--top-p/--seed reach the sampler; the prompt is
    tokenized independently on the reference side."""
    path = model_dir("tiny-qwen2")
    text = "The river wound slowly through the valley"
    out = run_json(2, "--model", str(path), "--prompt", text, "--no-chat", "--temp", "0.9",
                   "--top-p", "0.9", "--seed", "7", "--max-tokens", "10", "--ignore-eos")
    _, tokenizer = load(str(path))
    ids = tokenizer.encode(text)
    assert out["prompt_ids"] == ids
    assert out["tokens"] == mlx_lm_sampled(path, ids, 10, 0.9, 0.9, 0.0, 7)


def test_batch_seeds_per_line(model_dir, tmp_path):
    """A batch line with "seed": S gives the one-shot text of --seed S; lines that take
    --seed get --seed + (line number - 1), so identical prompts do not repeat each other."""
    path = model_dir("tiny-qwen2")
    text = "The river wound slowly through the valley"
    common = ("--model", str(path), "--no-chat", "--temp", "0.9", "--max-tokens", "8",
              "--ignore-eos")
    one_shot = {s: run_json(1, *common, "--prompt", text, "--seed", str(s))["completion"]
                for s in (4, 5)}
    lines = [{"id": "a", "prompt": text, "seed": 5}, {"id": "b", "prompt": text},
             {"id": "c", "prompt": text}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = tmp_path / "out.jsonl"
    proc = run_pipeline(2, "batch", str(tmp_path / "in.jsonl"), "-o", str(out), *common,
                        "--seed", "3", "--concurrency", "3")
    assert proc.returncode == 0, proc.stderr
    got = {r["id"]: r["completion"] for r in map(json.loads, out.read_text().splitlines())}
    assert got["a"] == one_shot[5]  # its own seed
    assert got["c"] == one_shot[5]  # line 3: --seed 3 + 2
    assert got["b"] == one_shot[4]  # line 2: --seed 3 + 1
    assert got["b"] != got["c"]
