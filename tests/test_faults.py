"""Fault injection over real mpirun: a rank killed mid-generation ends the whole job quickly."""

import os
import signal
import subprocess
import time

import pytest

from conftest import mpi_env, pipeline_cmd


def rank_pid(rank: int, marker: bytes) -> int | None:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        if marker in cmd and f"OMPI_COMM_WORLD_RANK={rank}".encode() in env:
            return int(pid)
    return None


def python_ranks(marker: bytes) -> list[int]:
    return [r for r in range(4) if rank_pid(r, marker) is not None]


@pytest.mark.parametrize("victim", [1, 0])
def test_kill_9_mid_generation_ends_the_job_within_10_s(model_dir, victim):
    marker = b"--max-tokens\x00100000"
    proc = subprocess.Popen(
        pipeline_cmd(3, "--model", str(model_dir("tiny-llama")), "--prompt", "go", "--no-chat",
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
    marker = b"--max-tokens\x0099999"
    proc = subprocess.Popen(
        pipeline_cmd(2, "--model", str(model_dir("tiny-llama")), "--prompt", "go", "--no-chat",
                     "--max-tokens", "99999", "--ignore-eos"),
        env=mpi_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.read(20)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    time.sleep(0.5)
    assert python_ranks(marker) == []
