"""Make ranks on Linux CPU use an optimized BLAS, and say which BLAS and device run.

The mlx-cpu wheel bundles the netlib reference BLAS (measured ~30x slower gemm than
OpenBLAS). Debian's OpenBLAS exports the same symbols, so preloading it before mlx is
loaded swaps it in; that needs a re-exec because LD_PRELOAD is read at process start.
Nothing here imports mlx: `ensure_fast_blas()` must run before it is imported. Before the
re-exec it also corrects OpenBLAS's kernel choice where a release older than the CPU falls
back to slow kernels (blas_kernels.py).
"""

from __future__ import annotations

import os
import sys

OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
)
_REEXEC_MARK = "PIPELINE_BLAS_REEXEC"
_NOTE = "PIPELINE_BLAS_NOTE"  # what choose_core decided, for the start-up line and doctor


def find_openblas() -> str | None:
    return next((p for p in OPENBLAS_CANDIDATES if os.path.exists(p)), None)


def ensure_fast_blas() -> None:
    """Re-exec this process with OpenBLAS preloaded when it is installed (Linux only).

    Set PIPELINE_BLAS=reference to keep the bundled BLAS. Also gives each rank a fair share
    of the cores when several ranks run on one host, unless OPENBLAS_NUM_THREADS is set.
    """
    if sys.platform != "linux" or "mlx" in sys.modules:
        return
    local_size = int(os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", "1"))
    if local_size > 1 and "OPENBLAS_NUM_THREADS" not in os.environ:
        os.environ["OPENBLAS_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // local_size))
    lib = find_openblas()
    preload = os.environ.get("LD_PRELOAD", "")
    if (lib is None or lib in preload or os.environ.get("PIPELINE_BLAS") == "reference"
            or os.environ.get(_REEXEC_MARK)):
        return
    from pipeline.host.blas_kernels import choose_core

    core, note = choose_core(lib)
    if core:
        os.environ["OPENBLAS_CORETYPE"] = core
    if note:
        os.environ[_NOTE] = note
    os.environ["LD_PRELOAD"] = f"{lib}:{preload}" if preload else lib
    os.environ[_REEXEC_MARK] = "1"
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def describe() -> tuple[str, str, bool]:
    """(device, BLAS, is_reference_blas) of this process, after mlx is imported."""
    import mlx.core as mx

    device = "gpu (Metal)" if mx.default_device() == mx.gpu else "cpu"
    if sys.platform == "darwin":
        return device, "Accelerate", False
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return device, "unknown", False
    for line in maps.splitlines():
        path = line.split()[-1]
        # numpy bundles its own OpenBLAS (scipy_openblas); mlx only uses a preloaded one
        if "libopenblas" in path and "scipy_openblas" not in path:
            return device, f"OpenBLAS{_openblas_details(path)} ({path})", False
    return device, "reference BLAS bundled with mlx-cpu", True


def _openblas_details(path: str) -> str:
    """' 0.3.21, SkylakeX kernels' for the OpenBLAS loaded from path (and what was corrected)."""
    import ctypes

    from pipeline.host.blas_kernels import corename

    try:
        lib = ctypes.CDLL(path)  # already loaded: the same handle
        lib.openblas_get_config.restype = ctypes.c_char_p
        words = (lib.openblas_get_config() or b"").decode().split()
    except (OSError, AttributeError):
        return ""
    version = next((w for w in words[1:2] if w[:1].isdigit()), "")
    note = os.environ.get(_NOTE, "")
    return f" {version}, {corename(lib)} kernels" + (f" ({note})" if note else "")


def rows_first_pays() -> bool:
    """Whether stage.RowsFirstLinear may be used: on a CPU with OpenBLAS (measured faster
    there), unless PIPELINE_ROWS_FIRST=0 (for side-by-side benchmarks); each shape is then
    checked for bitwise equality on the machine (host/rows_first.py)."""
    if os.environ.get("PIPELINE_ROWS_FIRST", "1") == "0":
        return False
    device, name, _ = describe()
    return device == "cpu" and name.startswith("OpenBLAS")
