"""The command launch/mpirun builds: --prefix (the venv holding mpirun) and a short TMPDIR.

Runs launch/mpirun beside a fake venv whose `mpirun` prints its TMPDIR and arguments, so the
logic is checked on any box; tests/test_netns_ssh.py runs the real one through ssh.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import launch_checkout

MAC_TMPDIR = "/var/folders/6j/vzv3ldfs7wzbhlqfw2yptx100000gr/T/"  # macOS's per-user TMPDIR
FAKE_MPIRUN = """#!/bin/sh
echo "TMPDIR=${TMPDIR-(unset)}"
for a in "$@"; do echo "$a"; done
"""


@pytest.fixture
def launch(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "mpirun").write_text(FAKE_MPIRUN)
    (venv / "bin" / "mpirun").chmod(0o755)
    (venv / "bin" / "python").symlink_to(sys.executable)  # the supervisor's Python
    script = launch_checkout(tmp_path / "checkout", venv)

    def run(*args: str, tmpdir: str | None = None) -> tuple[str, list[str]]:
        """(TMPDIR as mpirun saw it, mpirun's arguments)"""
        env = {k: v for k, v in os.environ.items() if k != "TMPDIR"}
        if tmpdir is not None:
            env["TMPDIR"] = tmpdir
        proc = subprocess.run([str(script), *args], capture_output=True, text=True, timeout=30,
                              env=env, stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, proc.stderr
        first, *argv = proc.stdout.splitlines()
        return first.removeprefix("TMPDIR="), argv

    run.venv = tmp_path / "checkout" / ".venv"
    return run


def test_prefix_is_the_venv_holding_mpirun(launch):
    _, argv = launch("-np", "2", "python", "-m", "pipeline")
    assert argv.count("--prefix") == 1
    assert argv[argv.index("--prefix") + 1] == str(launch.venv)  # the path as typed, not resolved
    assert argv[-5:] == ["-np", "2", "python", "-m", "pipeline"]


@pytest.mark.parametrize("given", [["--prefix", "/opt/ompi"], ["--prefix=/opt/ompi"], ["--noprefix"]])
def test_a_prefix_given_is_left_alone(launch, given):
    _, argv = launch(*given, "-np", "2", "python")
    assert [a for a in argv if a.startswith("--prefix") or a == "--noprefix"] == given[:1]
    assert str(launch.venv) not in argv


@pytest.mark.parametrize("tmpdir, seen", [
    (MAC_TMPDIR, "/tmp"),       # too long for Open MPI 5's session and shared-memory paths
    ("/tmp", "/tmp"),
    ("/scratch/me/tmp", "/scratch/me/tmp"),
    (None, "(unset)"),
])
def test_a_long_tmpdir_is_replaced_by_tmp(launch, tmpdir, seen):
    assert launch("-np", "2", "python", tmpdir=tmpdir)[0] == seen
