"""The chat REPL on rank 0, driven through stdin under a real 2-rank mpirun."""


from conftest import run_pipeline
from helpers import NullTokenizer
from pipeline.exec.driver import Driver
from pipeline.exec.sampling import SamplingParams
from pipeline.model.load import load_stage, read_config, resident_bytes


def test_two_turns_stats_reset_quit(model_dir):
    path = model_dir("tiny-qwen2")
    script = "hello there\n/stats\nand a second \\\nline\n/stats\n/reset\nagain\n/stats\n/help\n/quit\n"
    proc = run_pipeline(2, "--model", str(path), "--max-tokens", "8", input=script, timeout=180)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    stats = [block for block in out.split("prompt: ")[1:]]
    assert len(stats) == 3
    assert "reused from cache" not in stats[0]
    assert "reused from cache" in stats[1]  # the second turn prefilled only the new turn
    assert "reused from cache" not in stats[2]  # /reset dropped the cache on every rank
    assert "(conversation cleared)" in out and "/reset" in out  # /help printed the commands
    assert "rank 1 (" in stats[0]  # per-rank figures


def test_recurrent_model_reprefills_and_says_so(model_dir):
    """qwen3_next's linear attention keeps a recurrent state, which cannot drop tokens: a
    turn whose prompt does not extend every cached token (here the tiny model's answer does
    not re-tokenize to the same ids) is prefilled whole, and --verbose says why."""
    path = model_dir("tiny-qwen3-next")
    proc = run_pipeline(2, "--model", str(path), "--max-tokens", "8", "-v",
                        input="hello there\nand a second line\n/stats\n/quit\n", timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "the model keeps a recurrent state, which cannot drop tokens" in proc.stderr
    assert "prefilling all" in proc.stderr
    assert "reused from cache" not in proc.stdout


def test_end_of_input_exits_cleanly(model_dir):
    # Without mpirun: OpenMPI 5's mpirun does not pass end-of-input on to rank 0 (README).
    proc = run_pipeline(0, "--model", str(model_dir("tiny-qwen2")), "--max-tokens", "4",
                        input="hi\n", timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_non_utf8_input_is_rejected_not_fatal(model_dir, tmp_path):
    import subprocess

    from conftest import mpi_env, pipeline_cmd

    proc = subprocess.run(pipeline_cmd(2, "--model", str(model_dir("tiny-qwen2")), "--max-tokens", "4"),
                          input=b"\xff\xfe bad\nhi\n/quit\n", capture_output=True, timeout=120,
                          env=mpi_env())
    assert proc.returncode == 0, proc.stderr
    assert b"not valid UTF-8" in proc.stdout


def test_cache_reuse_gives_the_same_tokens_as_a_fresh_prefill(model_dir):
    """Turn 2 with the cache of turn 1 == turn 2 prefilled from scratch (in process, 1 rank)."""
    path = model_dir("tiny-gemma3")  # sliding-window layers too
    config = read_config(path)

    def fresh_driver():
        stage = load_stage(path, config, (0, config["num_hidden_layers"]), with_head=True)
        return Driver(None, stage, tokenizer=NullTokenizer(), weight_bytes=resident_bytes(stage))

    sampling = SamplingParams(max_tokens=6, ignore_eos=True)
    turn1 = list(range(10, 15))
    d = fresh_driver()
    first = [t for t, _ in d.generate(turn1, sampling) if t >= 0]
    turn2 = turn1 + first[:-1] + [40, 41, 42]
    reused = [t for t, _ in d.generate(turn2, sampling) if t >= 0]
    assert d.last_stats.cached_tokens == len(turn1) + len(first) - 1
    again = [t for t, _ in fresh_driver().generate(turn2, sampling) if t >= 0]
    assert reused == again
