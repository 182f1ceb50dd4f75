"""Which OpenBLAS kernels run, and a correction where OpenBLAS picks slow ones for a new CPU.

An OpenBLAS built with DYNAMIC_ARCH picks its kernels ("core") by the CPU's model number. A
release older than the CPU can miss it and fall back to its oldest x86 kernels (Debian's 0.3.21
takes some AVX-512 Xeons for a Prescott: measured float32 GEMM 28 GFLOP/s on one core against
150 with the SkylakeX kernels). The CPU's flags say what it can run, so where the core picked
lacks the AVX2 kernels the CPU could run, `correction` names better ones for OPENBLAS_CORETYPE;
they are used only after `check_core` has multiplied with them in a separate process and got
the right products (a bad kernel may crash or be wrong there, not in a rank). The verdict is
cached per library, CPU and core. Nothing here imports mlx.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

from pipeline.model.spec import cache_root

# OpenBLAS core names (OPENBLAS_CORETYPE accepts them) by the widest vector unit they use
AVX512_CORES = {"skylakex", "cooperlake", "sapphirerapids", "zen4"}
AVX2_CORES = {"haswell", "zen", "excavator", "steamroller"}
AVX_CORES = {"sandybridge", "bulldozer", "piledriver"}
CHECK_TIMEOUT_S = 60
# (rows, columns, inner) of float32 products checked: decode rows, prefill chunks, odd sizes
CHECK_SHAPES = [(1, 1024, 1024), (2, 64, 64), (7, 1536, 576), (16, 2816, 1024), (33, 100, 77),
                (256, 1024, 64), (512, 576, 1536)]


def vector_level_of_core(core: str) -> int:
    """0 (SSE kernels), 1 (AVX), 2 (AVX2) or 3 (AVX-512) for an OpenBLAS core name."""
    name = core.lower()
    if name in AVX512_CORES:
        return 3
    if name in AVX2_CORES:
        return 2
    return 1 if name in AVX_CORES else 0


def vector_level_of_cpu(flags: set[str]) -> int:
    """The same scale for a CPU, from its /proc/cpuinfo flags."""
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"} <= flags:
        return 3
    if {"avx2", "fma"} <= flags:
        return 2
    return 1 if "avx" in flags else 0


def cpu_facts(cpuinfo: str) -> tuple[str, str, set[str]]:
    """(vendor, model name, flags) of the first processor in a /proc/cpuinfo text."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            break
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return (fields.get("vendor_id", ""), fields.get("model name", ""),
            set(fields.get("flags", "").split()))


def correction(core: str, vendor: str, flags: set[str]) -> str | None:
    """The core to ask for instead of `core`, or None. Only a fallback is corrected: a core
    without AVX2 kernels on a CPU that has AVX2; a detected AVX2 or AVX-512 core is kept."""
    level = vector_level_of_cpu(flags)
    if vector_level_of_core(core) >= min(level, 2):
        return None
    if level == 3:
        return "SkylakeX"  # newer OpenBLAS releases run AMD's AVX-512 (Zen 4) on these too
    if level == 2:
        return "Zen" if vendor == "AuthenticAMD" else "Haswell"
    return "Sandybridge" if level == 1 else None


def corename(lib: ctypes.CDLL) -> str:
    """The core a loaded OpenBLAS runs ("unknown" for another BLAS)."""
    try:
        get = lib.openblas_get_corename
    except AttributeError:
        return "unknown"
    get.restype = ctypes.c_char_p
    return (get() or b"unknown").decode()


def product_error(lib: ctypes.CDLL) -> float:
    """Largest error of cblas_sgemm's products, in units of the float32 error bound
    (inner x eps x |A||B|), over CHECK_SHAPES in both operand layouts: below 1 is right."""
    import numpy as np

    sgemm = lib.cblas_sgemm
    f32p = ctypes.POINTER(ctypes.c_float)
    sgemm.argtypes = [ctypes.c_int] * 6 + [ctypes.c_float, f32p, ctypes.c_int, f32p,
                                           ctypes.c_int, ctypes.c_float, f32p, ctypes.c_int]
    rng = np.random.default_rng(0)
    worst = 0.0
    for m, n, k in CHECK_SHAPES:
        a = rng.standard_normal((m, k), dtype=np.float32)
        for b_transposed in (True, False):  # x @ W.T (mlx's Linear) and W @ x.T (rows first)
            b = rng.standard_normal((n, k) if b_transposed else (k, n), dtype=np.float32)
            c = np.full((m, n), np.nan, np.float32)
            ldb = k if b_transposed else n
            sgemm(101, 111, 112 if b_transposed else 111, m, n, k, 1.0,  # row major
                  a.ctypes.data_as(f32p), k, b.ctypes.data_as(f32p), ldb, 0.0,
                  c.ctypes.data_as(f32p), n)
            b64 = b.astype(np.float64).T if b_transposed else b.astype(np.float64)
            exact = a.astype(np.float64) @ b64
            bound = np.abs(a).astype(np.float64) @ np.abs(b64) * k * 2.0**-24 + 1e-30
            err = np.abs(c - exact) / bound
            worst = max(worst, float(np.nanmax(err)) if np.isfinite(c).all() else np.inf)
    return worst


def _check_in_this_process(lib_path: str) -> None:
    lib = ctypes.CDLL(lib_path)
    print(json.dumps({"core": corename(lib), "error": product_error(lib)}))


def check_core(lib_path: str, core: str) -> tuple[bool, str]:
    """Run OpenBLAS with OPENBLAS_CORETYPE=core in a child process: (usable, why)."""
    env = dict(os.environ, OPENBLAS_CORETYPE=core, OPENBLAS_NUM_THREADS="1")
    env.pop("LD_PRELOAD", None)
    code = f"from pipeline.host.blas_kernels import _check_in_this_process as c; c({lib_path!r})"
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    try:
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=CHECK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return False, f"the check with {core} kernels took over {CHECK_TIMEOUT_S} s"
    if proc.returncode != 0:
        return False, f"the check with {core} kernels exited {proc.returncode}"
    try:
        got = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return False, f"the check with {core} kernels printed no result"
    if got["core"].lower() != core.lower():
        return False, f"OpenBLAS ran {got['core']} kernels when asked for {core}"
    if not got["error"] < 1.0:
        return False, f"{core} kernels multiplied wrong ({got['error']:.3g}x the error bound)"
    return True, f"{core} kernels checked"


def load_verdicts(path: Path) -> dict:
    """A cache of machine checks (this file's and rows_first.py's); {} when absent or bad."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def save_verdicts(path: Path, known: dict) -> None:
    """Ranks on one host may write at once: each writes a whole file, the last one wins."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(known, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass


def cached_check(lib_path: str, core: str, cpu_model: str) -> tuple[bool, str]:
    """check_core, remembered per library file, CPU model and core (a failed check too)."""
    st = os.stat(lib_path)
    key = f"{os.path.realpath(lib_path)}|{st.st_size}|{st.st_mtime_ns}|{cpu_model}|{core}"
    path = cache_root() / "blas-kernels.json"
    known = load_verdicts(path)
    if key in known:
        ok, why = known[key]
        return bool(ok), str(why)
    ok, why = check_core(lib_path, core)
    known[key] = [ok, why]
    save_verdicts(path, known)
    return ok, why


def choose_core(lib_path: str) -> tuple[str | None, str]:
    """(OPENBLAS_CORETYPE to set or None, a note for the start-up line) for this process.

    PIPELINE_BLAS_CORE=keep leaves OpenBLAS's own choice (or the OPENBLAS_CORETYPE already
    set); PIPELINE_BLAS_CORE=NAME asks for NAME unchecked."""
    setting = os.environ.get("PIPELINE_BLAS_CORE", "auto")
    if setting.lower() == "keep":
        return None, ""
    if setting.lower() != "auto":
        return setting, "asked for by PIPELINE_BLAS_CORE"
    try:
        with open("/proc/cpuinfo") as f:
            vendor, model, flags = cpu_facts(f.read())
        core = corename(ctypes.CDLL(lib_path))
    except OSError:
        return None, ""
    better = correction(core, vendor, flags)
    if better is None:
        return None, ""
    ok, why = cached_check(lib_path, better, model)
    if not ok:
        return None, f"OpenBLAS's own choice kept: {why}"
    return better, f"not {core}, which OpenBLAS picked for this CPU"
