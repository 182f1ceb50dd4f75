"""Batch prompt files over real mpirun: every result's token ids equal single-process mlx-lm's
greedy ids (mlx-lm tokenizing the prompt text itself)."""

import json
import os
import signal
import subprocess
import time

import pytest

from conftest import mlx_lm_oracle, mpi_env, pipeline_cmd, run_pipeline
from helpers import rank_pid

PROMPTS = [
    "hello there",
    "The quick brown fox jumps over the lazy dog and keeps on running far away",
    "a",
    "Once upon a time there was a small village",
    "what is the answer",
    "x y z",
    "The weather today is",
    "Many words make a much longer prompt than the others, so its prefill takes several chunks "
    "while the other sequences keep decoding",
    "bye",
    "in the end",
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.mark.parametrize("np_, arch", [(2, "tiny-llama"), (3, "tiny-gemma3"), (1, "tiny-qwen3"),
                                       (2, "tiny-qwen3-moe"), (2, "tiny-deepseek-v3"),
                                       (2, "tiny-qwen3-next")])
def test_batch_equals_one_shot_oracle(model_dir, tmp_path, np_, arch):
    model = model_dir(arch)
    records = [{"id": f"p{i}", "prompt": p, "max_tokens": 6 + 3 * (i % 4)}
               for i, p in enumerate(PROMPTS)]
    # starts with p1's prompt, which the prompt cache kept once it was prefilled: a whole
    # prefix, so even caches that cannot be cut back (qwen3_next's recurrent state, gemma3's
    # wrapped 8-token windows) give it as an exact snapshot
    records.append({"id": "again", "prompt": PROMPTS[1] + " and again", "max_tokens": 6})
    write_jsonl(tmp_path / "in.jsonl", records)
    out = tmp_path / "out.jsonl"
    proc = run_pipeline(np_, "batch", str(tmp_path / "in.jsonl"), "-o", str(out), "--model",
                        str(model), "--no-chat", "--ignore-eos", "--concurrency", "4",
                        "--prefill-chunk", "8")
    assert proc.returncode == 0, proc.stderr
    results = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert sorted(results) == sorted(r["id"] for r in records)
    for rec in records:
        got = results[rec["id"]]
        ids, expected = mlx_lm_oracle(model, rec["prompt"], rec["max_tokens"], chat=False)
        assert got["prompt_tokens"] == len(ids)
        assert got["completion_ids"] == expected
        assert got["completion_tokens"] == len(expected) == rec["max_tokens"]
        for field in ("prompt", "completion", "finish_reason", "ttft_s", "tokens_per_s"):
            assert field in got
    assert results["again"]["cached_tokens"] >= 8
    assert "11 done" in proc.stderr and "TTFT p50" in proc.stderr


def test_txt_file_malformed_lines_and_sampling(model_dir, tmp_path):
    model = model_dir("tiny-qwen2")
    (tmp_path / "in.txt").write_bytes(b"first prompt\n\xff\xfe broken\nthird prompt\n")
    out = tmp_path / "out.jsonl"
    proc = run_pipeline(2, "batch", str(tmp_path / "in.txt"), "-o", str(out), "--model", str(model),
                        "--no-chat", "--max-tokens", "5", "--temp", "0.8", "--seed", "1",
                        "--ignore-eos")
    assert proc.returncode == 2, proc.stderr  # the other lines done, the bad one reported
    assert "in.txt:2: not valid UTF-8" in proc.stderr
    assert f"1 malformed line of {tmp_path / 'in.txt'} skipped" in proc.stderr
    results = [json.loads(l) for l in out.read_text().splitlines()]
    assert sorted(r["id"] for r in results) == [1, 3]
    assert all(r["completion_tokens"] == 5 for r in results)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "ok"}\nnot json\n{"id": "b"}\n')
    proc = run_pipeline(2, "batch", str(bad), "-o", str(tmp_path / "o2.jsonl"), "--model",
                        str(model), "--max-tokens", "3")
    assert proc.returncode == 2, proc.stderr
    assert "bad.jsonl:2:" in proc.stderr and "bad.jsonl:3:" in proc.stderr
    assert "2 malformed lines of" in proc.stderr and "fix them and rerun" in proc.stderr
    assert [json.loads(l)["id"] for l in (tmp_path / "o2.jsonl").read_text().splitlines()] == ["a"]


def test_unwritable_output_fails_before_work(model_dir, tmp_path):
    (tmp_path / "in.txt").write_text("hi\n")
    proc = run_pipeline(2, "batch", str(tmp_path / "in.txt"), "-o", "/nonexistent/dir/out.jsonl",
                        "--model", str(model_dir("tiny-qwen2")), timeout=60)
    assert proc.returncode != 0
    assert "cannot write output file /nonexistent/dir/out.jsonl" in proc.stderr


def test_kill_rank0_mid_run_then_resume(model_dir, tmp_path):
    model = model_dir("tiny-llama")
    records = [{"id": i, "prompt": f"prompt number {i} says", "max_tokens": 40} for i in range(24)]
    write_jsonl(tmp_path / "in.jsonl", records)
    out = tmp_path / "out.jsonl"
    args = ["batch", str(tmp_path / "in.jsonl"), "-o", str(out), "--model", str(model),
            "--no-chat", "--ignore-eos", "--concurrency", "2"]
    proc = subprocess.Popen(pipeline_cmd(3, *args), env=mpi_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 3):
        time.sleep(0.05)
    pid = rank_pid(0, b"pipeline", b"batch")
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    lines = out.read_text().splitlines()
    first = [json.loads(l)["id"] for l in lines]  # every kept line is complete JSON
    assert 3 <= len(first) < len(records)

    proc = run_pipeline(3, *args)
    assert proc.returncode == 0, proc.stderr
    ids = [json.loads(l)["id"] for l in out.read_text().splitlines()]
    assert sorted(ids) == list(range(24))  # the rest completed, nothing twice
    assert ids[: len(first)] == first


def test_plan_follows_the_sequences_there(tmp_path):
    """min(--concurrency, prompts not yet in OUT) sequences: what the planner plans for."""
    from pipeline.commands.batch import sequences_at_once

    write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": p} for i, p in enumerate(PROMPTS)])
    out = tmp_path / "out.jsonl"
    assert sequences_at_once(tmp_path / "in.jsonl", out, 32) == len(PROMPTS)
    assert sequences_at_once(tmp_path / "in.jsonl", out, 4) == 4
    out.write_text("".join(json.dumps({"id": i}) + "\n" for i in range(len(PROMPTS) - 1))
                   + '{"id": 9, "compl')  # a partial last line is not a result
    assert sequences_at_once(tmp_path / "in.jsonl", out, 32) == 1
    assert out.read_text().endswith('"compl')  # only read, never cut here
    assert sequences_at_once(tmp_path / "missing.txt", out, 8) == 8


@pytest.mark.parametrize("lines, words", [(1, "one chat"), (3, "many sequences")])
def test_batch_plans_for_one_chat_when_one_prompt_runs(model_dir, tmp_path, lines, words):
    (tmp_path / "in.txt").write_text("".join(f"{p}\n" for p in PROMPTS[:lines]))
    proc = run_pipeline(2, "batch", str(tmp_path / "in.txt"), "-o", str(tmp_path / "o.jsonl"),
                        "--model", str(model_dir("tiny-llama")), "--max-tokens", "2",
                        "--concurrency", "32")
    assert proc.returncode == 0, proc.stderr
    assert f"(planned for {words})" in proc.stderr
