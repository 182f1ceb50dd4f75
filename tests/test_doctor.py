"""`python -m pipeline doctor` over real mpirun: the table, and problems it must name."""

import shutil
import socket
import subprocess
import sys
from importlib import metadata

import pytest

from conftest import MPIRUN, ROOT, mpi_env, run_pipeline
from pipeline.exec.blas import find_openblas


def doctor_mpmd(model_a, model_b):
    """Rank 0 checks model_a and rank 1 model_b: one job, two command lines (MPMD)."""
    py = [sys.executable, "-m", "pipeline", "doctor", "--model"]
    cmd = [MPIRUN, "--oversubscribe", "--bind-to", "none",
           "-np", "1", *py, str(model_a), ":", "-np", "1", *py, str(model_b)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=mpi_env(),
                          cwd=ROOT)


def rank_rows(out):
    return {line.split()[0]: line for line in out.splitlines()
            if line.split() and line.split()[0] in {"0", "1", "2"} and "->" not in line}


def test_two_ranks_healthy(model_dir):
    path = model_dir("tiny-llama")
    proc = run_pipeline(2, "doctor", "--model", str(path), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert out.startswith("pipeline doctor: 2 rank(s) on 1 host(s); MPI: Open MPI v")
    rows = rank_rows(out)
    blas = "OpenBLAS" if find_openblas() else "reference BLAS bundled with mlx-cpu"
    for rank in ("0", "1"):
        row = rows[rank]
        assert socket.gethostname() in row and "cpu" in row and blas in row
        for package in ("mlx", "mlx-lm", "mpi4py", "numpy"):
            assert metadata.version(package) in row
        assert "GB/s" in row and "GiB" in row  # memory bandwidth, memory and disk
        assert "2/2" in row  # config.json and model.safetensors present
    link = next(line for line in out.splitlines() if line.startswith("0 -> 1"))
    assert (" us" in link or " ms" in link) and "GB/s" in link
    assert f"model: {path} (config.json, model.safetensors; sizes and sha256 compared" in out
    assert out.rstrip().endswith("doctor: no problems")


def test_single_process_without_model():
    proc = run_pipeline(0, "doctor", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 rank(s) on 1 host(s)" in proc.stdout and "0 -> 1" not in proc.stdout
    assert "model: not checked (give --model)" in proc.stdout


@pytest.fixture
def model_copy(model_dir, tmp_path):
    src = model_dir("tiny-llama")
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return src, dst


def test_corrupted_weights_on_one_rank(model_copy):
    good, bad = model_copy
    weights = bad / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes
    weights.write_bytes(bytes(data))
    proc = doctor_mpmd(good, bad)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"rank 1 ({socket.gethostname()}): {bad}/model.safetensors differs from rank 0's" \
        in proc.stdout
    assert "config.json differs" not in proc.stdout
    assert proc.stdout.rstrip().endswith("doctor: 1 problem(s)")


def test_missing_and_changed_files_are_all_named(model_copy):
    good, bad = model_copy
    (bad / "model.safetensors").unlink()
    (bad / "config.json").write_text((good / "config.json").read_text() + "\n")
    proc = doctor_mpmd(good, bad)
    assert proc.returncode == 1
    assert f"{bad}/model.safetensors is missing" in proc.stdout
    assert f"{bad}/config.json differs from rank 0's" in proc.stdout
    assert proc.stdout.rstrip().endswith("doctor: 2 problem(s)")
    assert "1/2" in rank_rows(proc.stdout)["1"]


def test_model_folder_missing_on_one_rank(model_copy, tmp_path):
    good, _ = model_copy
    proc = doctor_mpmd(good, tmp_path / "nowhere")
    assert proc.returncode == 1
    assert f"rank 1 ({socket.gethostname()}): model folder {tmp_path / 'nowhere'} does not exist" \
        in proc.stdout


def test_huge_pages_off_is_a_warning_not_a_problem():
    from pipeline.doctor import RankReport, find_problems

    def report(mode):
        return RankReport(0, "h", "3.11", {}, "Open MPI", "cpu", "OpenBLAS", False,
                          huge_pages=mode)

    problems, warnings = find_problems([report("never")], None, None)
    assert problems == []
    assert len(warnings) == 1 and "transparent huge pages are off" in warnings[0]
    assert "echo madvise > /sys/kernel/mm/transparent_hugepage/enabled" in warnings[0]
    for mode in ("madvise", "always", None):
        assert find_problems([report(mode)], None, None) == ([], [])
