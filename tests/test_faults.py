"""Fault injection over real mpirun: a rank killed mid-generation ends the whole job quickly."""

import os
import signal
import subprocess
import time

import pytest

from conftest import mpi_env, pipeline_cmd
from helpers import rank_pid


def python_ranks(marker: bytes) -> list[int]:
    return [r for r in range(4) if rank_pid(r, marker) is not None]


def job_marker(model, max_tokens: int) -> bytes:
    """Bytes of a rank's command line that no other job on this machine has (other test
    sessions run at the same time, with models in their own temporary folders)."""
    return f"{model}\0--prompt\0go\0--no-chat\0--max-tokens\0{max_tokens}\0".encode()


@pytest.mark.parametrize("victim", [1, 0])
def test_kill_9_mid_generation_ends_the_job_within_10_s(model_dir, victim):
    model = model_dir("tiny-llama")
    marker = job_marker(model, 100000)
    proc = subprocess.Popen(
        pipeline_cmd(3, "--model", str(model), "--prompt", "go", "--no-chat",
                     "--max-tokens", "100000", "--ignore-eos"),
        env=mpi_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.read(20)  # tokens are streaming: generation is under way
    pid = rank_pid(victim, marker)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    _, err = proc.communicate(timeout=30)
    assert time.monotonic() - killed < 10
    assert proc.returncode != 0
    assert f"rank {victim}" in err.decode() and "signal 9" in err.decode()
    time.sleep(0.5)
    assert python_ranks(marker) == []  # no rank left behind


def test_sigterm_to_mpirun_leaves_no_orphans(model_dir):
    model = model_dir("tiny-llama")
    marker = job_marker(model, 99999)
    proc = subprocess.Popen(
        pipeline_cmd(2, "--model", str(model), "--prompt", "go", "--no-chat",
                     "--max-tokens", "99999", "--ignore-eos"),
        env=mpi_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.read(20)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    time.sleep(0.5)
    assert python_ranks(marker) == []


@pytest.mark.parametrize("victim, verbose", [(1, False), (1, True), (0, False)])
def test_exception_on_any_rank_aborts_the_job(model_dir, victim, verbose):
    """PIPELINE_FAULT (a test hook in pipeline/exec/worker.py) raises on one rank mid-generation."""
    import socket

    model = model_dir("tiny-llama")
    marker = job_marker(model, 99998)
    env = dict(mpi_env(), PIPELINE_FAULT=f"rank{victim}:step30")
    proc = subprocess.Popen(
        pipeline_cmd(2, "--model", str(model), "--prompt", "go", "--no-chat",
                     "--max-tokens", "99998", "--ignore-eos", *(["--verbose"] * verbose)),
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:  # until the failing rank says why
        lines.append(line)
        if line.startswith("pipeline: error:"):
            break
    said = time.monotonic()
    lines += proc.communicate(timeout=60)[1].splitlines(keepends=True)
    assert time.monotonic() - said < 30  # the whole job is gone soon after (10 s unloaded)
    assert proc.returncode != 0
    err = "".join(lines)
    errors = [l for l in lines if l.startswith("pipeline: error:")]
    assert errors == [f"pipeline: error: rank {victim} ({socket.gethostname()}) failed: "
                      f"RuntimeError: fault injected by PIPELINE_FAULT=rank{victim}:step30\n"], err
    assert ("Traceback" in err and "injected_fault" in err) == verbose  # full traceback
    time.sleep(0.5)
    assert python_ranks(marker) == []  # no rank left behind
