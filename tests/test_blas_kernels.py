"""OpenBLAS kernel choice (pipeline/host/blas_kernels.py): the fallback rule over sample CPUs,
the product check catching wrong kernels, and a rank correcting a forced Prescott on this box."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import numpy as np
import pytest

from pipeline.host import blas_kernels as bk
from pipeline.host.blas import find_openblas

from conftest import ROOT

XEON_FLAGS = set("fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2 bmi2 avx512f avx512dq "
                 "avx512cd avx512bw avx512vl avx512_bf16 amx_tile".split())
ZEN3_FLAGS = set("fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2 bmi2".split())
OLD_FLAGS = set("fpu sse sse2 ssse3 sse4_1 sse4_2".split())


@pytest.mark.parametrize("core,vendor,flags,want", [
    ("Prescott", "GenuineIntel", XEON_FLAGS, "SkylakeX"),   # the Debian 0.3.21 case
    ("Core2", "GenuineIntel", ZEN3_FLAGS, "Haswell"),
    ("Prescott", "AuthenticAMD", ZEN3_FLAGS, "Zen"),
    ("Sandybridge", "GenuineIntel", XEON_FLAGS, "SkylakeX"),
    ("SkylakeX", "GenuineIntel", XEON_FLAGS, None),          # right already
    ("Cooperlake", "GenuineIntel", XEON_FLAGS, None),
    ("Zen", "AuthenticAMD", XEON_FLAGS, None),               # an AVX2 core is not a fallback
    ("Haswell", "GenuineIntel", ZEN3_FLAGS, None),
    ("Prescott", "GenuineIntel", OLD_FLAGS, None),           # nothing better to run
])
def test_correction_replaces_only_fallbacks(core, vendor, flags, want):
    assert bk.correction(core, vendor, flags) == want


def test_cpu_facts_reads_the_first_processor():
    text = ("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R)\n"
            "flags\t\t: fpu avx2 fma\n\nprocessor\t: 1\nvendor_id\t: Other\n")
    assert bk.cpu_facts(text) == ("GenuineIntel", "Intel(R) Xeon(R)", {"fpu", "avx2", "fma"})


class NumpyBlas:
    """cblas_sgemm written with numpy, optionally off by `skew` in one element."""

    def __init__(self, skew: float = 0.0):
        self.skew = skew

        def sgemm(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
            a_ = np.ctypeslib.as_array(a, (m, k))
            b_ = np.ctypeslib.as_array(b, (n, k) if tb == 112 else (k, n))
            out = np.ctypeslib.as_array(c, (m, n))
            out[...] = a_ @ (b_.T if tb == 112 else b_)
            out[m // 2, n // 2] += self.skew
        self.cblas_sgemm = sgemm


def test_product_error_accepts_right_products_and_catches_wrong_ones():
    assert bk.product_error(NumpyBlas()) < 1.0
    assert bk.product_error(NumpyBlas(skew=0.05)) > 1.0


needs_openblas = pytest.mark.skipif(find_openblas() is None,
                                    reason="OpenBLAS is not installed (libopenblas0-pthread)")


@needs_openblas
def test_check_core_runs_the_kernels_it_names(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_CACHE", str(tmp_path))
    lib = find_openblas()
    ok, why = bk.check_core(lib, "Prescott")  # the oldest kernels run on every x86-64 CPU
    assert ok, why
    ok, why = bk.check_core(lib, "NoSuchCore")
    assert not ok and "when asked for NoSuchCore" in why
    # cached: a second verdict comes from the file, the same
    assert bk.cached_check(lib, "Prescott", "test cpu") == bk.cached_check(lib, "Prescott",
                                                                          "test cpu")
    assert "Prescott" in (tmp_path / "blas-kernels.json").read_text()


def _this_cpu():
    with open("/proc/cpuinfo") as f:
        return bk.cpu_facts(f.read())


@needs_openblas
def test_a_rank_corrects_a_prescott_fallback(tmp_path):
    """OPENBLAS_CORETYPE=Prescott stands in for a CPU that OpenBLAS does not know: the ranks'
    BLAS then runs the kernels the CPU's flags allow, and the start-up text says so."""
    vendor, _, flags = _this_cpu()
    want = bk.correction("Prescott", vendor, flags)
    if want is None:
        pytest.skip("this CPU has no AVX2: Prescott kernels are the right ones")
    env = dict(os.environ, OPENBLAS_CORETYPE="Prescott", PIPELINE_CACHE=str(tmp_path),
               PYTHONPATH=str(ROOT))
    env.pop("LD_PRELOAD", None)
    env.pop("PIPELINE_BLAS_REEXEC", None)
    code = ("from pipeline.host.blas import ensure_fast_blas, describe\n"
            "ensure_fast_blas()\n"
            "import mlx.core\n"
            "print(describe()[1])")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"{want} kernels (not Prescott, which OpenBLAS picked" in out.stdout, out.stdout
    env["PIPELINE_BLAS_CORE"] = "keep"
    kept = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert "Prescott kernels" in kept.stdout, kept.stdout


@needs_openblas
def test_corename_of_the_installed_openblas():
    core = bk.corename(ctypes.CDLL(find_openblas()))
    assert core != "unknown"
