"""Bad input: one clear line on stderr, a non-zero exit, and no rank left hanging (real mpirun)."""

import json
import subprocess

import pytest

from conftest import ROOT, mpi_env, pipeline_cmd, run_pipeline


def assert_clean_failure(proc, *needles):
    assert proc.returncode != 0
    errors = [l for l in proc.stderr.splitlines() if l.startswith("pipeline: error:")]
    assert len(errors) == 1, proc.stderr  # said once, by rank 0
    for needle in needles:
        assert needle in errors[0]
    assert "Traceback" not in proc.stderr


def test_missing_model_path():
    proc = run_pipeline(2, "--model", "/nonexistent/model", "--prompt", "hi", timeout=60)
    assert_clean_failure(proc, "/nonexistent/model", "does not exist")


def test_unsupported_architecture(model_dir, tmp_path):
    src = model_dir("tiny-llama")
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_type"] = "no_such_arch"
    (tmp_path / "config.json").write_text(json.dumps(config))
    proc = run_pipeline(2, "--model", str(tmp_path), "--prompt", "hi", timeout=60)
    assert_clean_failure(proc, "unsupported model_type 'no_such_arch'")
    # granite divides its logits after the head: refused, saying so, before anything loads
    config.update(model_type="granite", logits_scaling=4.0, attention_multiplier=0.25,
                  embedding_multiplier=12.0, residual_multiplier=0.2, attention_bias=False,
                  mlp_bias=False)
    (tmp_path / "config.json").write_text(json.dumps(config))
    proc = run_pipeline(2, "--model", str(tmp_path), "--prompt", "hi", timeout=60)
    assert_clean_failure(proc, "model_type 'granite'", "after its blocks")


def test_more_ranks_than_layers(model_dir):
    path = model_dir("tiny-llama", num_layers=2)
    proc = run_pipeline(3, "--model", str(path), "--prompt", "hi", timeout=60)
    assert_clean_failure(proc, "3 ranks", "only 2 layers")


@pytest.mark.parametrize("split, needle", [("3,3", "sums to 6"), ("7", "1 entries"), ("x", "comma")])
def test_bad_split(model_dir, split, needle):
    proc = run_pipeline(2, "--model", str(model_dir("tiny-llama")), "--prompt", "hi",
                        "--split", split, timeout=60)
    assert_clean_failure(proc, "--split", needle)


@pytest.mark.parametrize("args, needle", [
    (["--temp", "-1"], "--temp"),
    (["--top-p", "1.5"], "--top-p"),
    (["--max-tokens", "0"], "--max-tokens"),
    (["--prompt", "  "], "empty"),
])
def test_bad_sampling_values(model_dir, args, needle):
    base = ["--model", str(model_dir("tiny-llama"))]
    if "--prompt" not in args:
        base += ["--prompt", "hi"]
    proc = run_pipeline(2, *base, *args, timeout=60)
    assert_clean_failure(proc, needle)


def test_model_that_does_not_fit_is_refused_before_loading(model_dir):
    proc = run_pipeline(2, "--model", str(model_dir("tiny-llama")), "--prompt", "hi",
                        "--max-context", "2000000000", "--verbose", timeout=60)
    assert_clean_failure(proc, "does not fit", "--max-context 2000000000")
    assert "short by" in proc.stderr and "what would fit: --max-context" in proc.stderr
    assert "loading layers" not in proc.stderr  # --verbose would log any rank's load


def test_prompt_longer_than_the_context_window(model_dir):
    proc = run_pipeline(2, "--model", str(model_dir("tiny-llama")), "--prompt", "word " * 50,
                        "--no-chat", "--max-context", "16", timeout=60)
    assert_clean_failure(proc, "context window is 16")


def test_repl_survives_a_prompt_too_long(model_dir):
    proc = run_pipeline(2, "--model", str(model_dir("tiny-llama")), "--max-context", "40",
                        "--max-tokens", "4", input="word " * 60 + "\nhi\n/quit\n", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "context window is 40" in proc.stdout


def test_hub_repo_not_cached_without_network(tmp_path):
    import os

    env_extra = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    os.environ.update(env_extra)
    try:
        proc = run_pipeline(2, "--model", "nobody-here/not-a-model", "--prompt", "hi", timeout=60)
    finally:
        for k in env_extra:
            os.environ.pop(k)
    assert_clean_failure(proc, "nobody-here/not-a-model", "not in the local cache")


def _copy_model(src, dst):
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize("damage, needle", [
    ("truncated", "truncated"),  # a download cut short: the header promises more data
    ("header", "not a readable safetensors file"),  # garbage in the JSON header
    ("length", "header length"),  # a corrupted 8-byte header length
])
def test_truncated_or_corrupted_safetensors(model_dir, tmp_path, damage, needle):
    path = _copy_model(model_dir("tiny-llama"), tmp_path)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "header":
        data = data[:8] + b"#" * 32 + data[40:]
    else:
        data = b"\xff" * 8 + data[8:]
    weights.write_bytes(data)
    proc = run_pipeline(2, "--model", str(path), "--prompt", "hi", timeout=60)
    assert_clean_failure(proc, str(weights), needle, "re-download")


@pytest.mark.parametrize("damage, needle", [
    ("missing", "no config.json in"),
    ("invalid", "config.json is not valid JSON"),
])
def test_config_json_missing_or_invalid(model_dir, tmp_path, damage, needle):
    path = _copy_model(model_dir("tiny-llama"), tmp_path)
    if damage == "missing":
        (path / "config.json").unlink()
    else:
        (path / "config.json").write_text('{"model_type": "llama",\n')
    proc = run_pipeline(2, "--model", str(path), "--prompt", "hi", timeout=60)
    assert_clean_failure(proc, str(path), needle)


MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK")


@pytest.mark.parametrize("mlx_rank, says", [("0", True), ("1", False)])
def test_mlx_launch_is_refused(mlx_rank, says):
    """What mlx.launch (ring/JACCL) gives each process: MLX_RANK and no Open MPI job."""
    env = {k: v for k, v in mpi_env().items() if k not in MPI_RANK_VARS}
    env.update(MLX_RANK=mlx_rank, MLX_WORLD_SIZE="2")
    proc = subprocess.run(pipeline_cmd(0, "--prompt", "hi"), capture_output=True, text=True,
                          timeout=60, env=env, cwd=ROOT)
    assert proc.returncode == 2
    errors = [l for l in proc.stderr.splitlines() if l.startswith("pipeline: error:")]
    if says:  # MLX's rank 0 says why, once; the others only exit
        assert errors == [l for l in proc.stderr.splitlines() if l.strip()]
        assert "started by mlx.launch" in errors[0] and "launch/mpirun" in errors[0]
    else:
        assert errors == [] and "Traceback" not in proc.stderr


def test_mlx_rank_under_mpirun_is_not_refused():
    env = dict(mpi_env(), MLX_RANK="0")
    proc = subprocess.run(pipeline_cmd(1, "--help"), capture_output=True, text=True, timeout=60,
                          env=env, cwd=ROOT)
    assert proc.returncode == 0 and "mlx.launch" not in proc.stderr, proc.stderr
