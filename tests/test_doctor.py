"""`python -m pipeline doctor` over real mpirun: the table, and problems it must name."""

import shutil
import socket
import subprocess
import sys
from importlib import metadata

import pytest

from conftest import MPIRUN, ROOT, mpi_env, run_pipeline
from pipeline.host.blas import find_openblas


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
    assert "tensor parallel: available (MLX's MPI backend started" in out
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
    from pipeline.commands.doctor import RankReport, find_problems

    def report(mode):
        return RankReport(0, "h", "3.11", {}, "Open MPI", "cpu", "OpenBLAS", False,
                          huge_pages=mode)

    problems, warnings = find_problems([report("never")], None, None)
    assert problems == []
    assert len(warnings) == 1 and "transparent huge pages are off" in warnings[0]
    assert "echo madvise > /sys/kernel/mm/transparent_hugepage/enabled" in warnings[0]
    for mode in ("madvise", "always", None):
        assert find_problems([report(mode)], None, None) == ([], [])


def _gpu(rank, host, total, recommended):
    from pipeline.place.cluster import Capacity

    return Capacity(rank, host, total, None, "gpu", "Apple M4 Max", recommended, 546e9, None,
                    "/")


def test_weights_over_a_macs_wired_limit_are_a_warning():
    """A Mac rank planned to hold more than its GPU wired limit: a warning with the sysctl."""
    from pipeline.commands.doctor import RankReport, find_problems

    GiB = 2**30
    reports = [RankReport(r, f"mac{r}", "3.12", {}, "Open MPI", "gpu (Metal)", "Accelerate",
                          False, wired_limit_mb=limit) for r, limit in enumerate((0, 122880))]
    caps = [_gpu(0, "mac0", 128 * GiB, 96 * GiB), _gpu(1, "mac1", 128 * GiB, 120 * GiB)]
    problems, warnings = find_problems(reports, caps, None, planned=[100 * GiB, 100 * GiB])
    assert problems == [] and len(warnings) == 1
    assert warnings[0].startswith("rank 0 (mac0): its planned weights (100 GiB) are over 90% of "
                                  "the GPU wired limit (96 GiB, macOS's default, "
                                  "iogpu.wired_limit_mb=0)")
    assert "sudo sysctl iogpu.wired_limit_mb=114688" in warnings[0]
    # without a plan (no --model) or on a CPU: nothing to compare
    assert find_problems(reports, caps, None) == ([], [])


def test_a_hop_off_the_hostfiles_interface_is_a_warning():
    from pipeline.commands.doctor import RankReport, find_problems
    from pipeline.place.hostfile import parse_hostfile_text, rank_entries
    from pipeline.place.routes import HopRoute

    hosts = rank_entries(parse_hostfile_text(
        "192.168.1.1 slots=1 # pipeline: iface=bridge0\n"
        "192.168.1.20 slots=1 # pipeline: iface=bridge0\n", "tb"))
    reports = [RankReport(r, f"mac{r}", "3.12", {}, "Open MPI", "gpu (Metal)", "Accelerate",
                          False) for r in range(2)]
    reports[0].route = HopRoute(0, 1, "192.168.1.20", "192.168.1.20", "en0", "Wi-Fi", True)
    reports[1].route = HopRoute(1, 0, "192.168.1.1", "192.168.1.1", "bridge0",
                                "Thunderbolt Bridge")
    problems, warnings = find_problems(reports, None, None, hosts=hosts)
    assert problems == [] and warnings == [
        "link 0 -> 1: the route to 192.168.1.20 goes over en0 (Wi-Fi), but the hostfile says "
        "iface=bridge0 (line 2): is another interface on the same subnet? give the link a "
        "subnet of its own"]


def test_hostfile_that_does_not_match_the_job(model_dir, tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=1   # pipeline: iface=bridge0\n")
    proc = run_pipeline(2, "doctor", "--hostfile", str(hostfile), timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"{hostfile} has 1 slots but the job has 2 ranks" in proc.stdout
    link = next(line for line in proc.stdout.splitlines() if line.startswith("0 -> 1"))
    assert link.rstrip().endswith("same host")  # both ranks here: shared memory, no route


def test_planned_weights_as_a_run_would_place_them(model_dir):
    from pipeline.commands.doctor import planned_weights
    from pipeline.place.cluster import Capacity

    path = model_dir("tiny-llama")
    caps = [Capacity(r, f"h{r}", 2**30, None, "cpu", "x", None, 1e9, None, "/")
            for r in range(2)]
    weights, error = planned_weights(str(path), caps, None)
    assert error is None and len(weights) == 2 and min(weights) > 0
    tiny = [Capacity(r, f"h{r}", 2**20, None, "cpu", "x", None, 1e9, None, "/")
            for r in range(2)]
    weights, error = planned_weights(str(path), tiny, None)
    assert weights is None and error.startswith("a run would not start: ")
    assert planned_weights(None, caps, None) == (None, None)  # no --model: no plan
