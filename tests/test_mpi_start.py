"""wire/mpi.py: when MLX starts MPI (so tensor-parallel groups can all-reduce in the graph)."""

import subprocess
import sys

from conftest import MPIRUN, ROOT, mpi_env
from pipeline.wire import mpi


def test_launched_size_reads_the_launchers_environment():
    assert mpi.launched_size({}) == 1
    assert mpi.launched_size({"OMPI_COMM_WORLD_SIZE": "3"}) == 3
    assert mpi.launched_size({"PMI_SIZE": "2"}) == 2
    assert mpi.launched_size({"OMPI_COMM_WORLD_SIZE": ""}) == 1


def test_mpi_library_is_the_venvs_real_one(tmp_path):
    (tmp_path / "lib").mkdir()
    assert mpi.mpi_library(str(tmp_path), "linux") is None
    (tmp_path / "lib" / "libmpi.so.40").write_bytes(b"")
    (tmp_path / "lib" / "libmpi.40.dylib").write_bytes(b"")
    assert mpi.mpi_library(str(tmp_path), "linux").endswith("lib/libmpi.so.40")
    assert mpi.mpi_library(str(tmp_path), "darwin").endswith("lib/libmpi.40.dylib")


SCRIPT = """
import sys
from pipeline.wire import mpi
mpi.start()
from mpi4py import MPI
import mlx.core as mx
world = mpi.world()
sub = world.split(0) if world is not None else None
x = mx.distributed.all_sum(mx.ones(3), group=sub) if sub is not None else mx.zeros(3)
mx.eval(x)
print(MPI.COMM_WORLD.Get_rank(), mpi.unavailable(), x.tolist(), flush=True)
KEEP = sub  # a live split group at exit: without finish() Open MPI ends the job with 14
mpi.finish(0)
"""


def test_mlx_starts_mpi_and_mpi4py_joins_it():
    proc = subprocess.run([MPIRUN, "-np", "2", "--oversubscribe", sys.executable, "-c", SCRIPT],
                          capture_output=True, text=True, env=mpi_env(), cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = sorted(proc.stdout.split("\n"))[-2:]
    assert lines == ["0 None [2.0, 2.0, 2.0]", "1 None [2.0, 2.0, 2.0]"]


def test_opting_out_leaves_mpi_to_mpi4py():
    env = {**mpi_env(), "PIPELINE_MLX_MPI": "0"}
    proc = subprocess.run([MPIRUN, "-np", "2", "--oversubscribe", "-x", "PIPELINE_MLX_MPI",
                           sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "PIPELINE_MLX_MPI=0 is set [0.0, 0.0, 0.0]" in proc.stdout
