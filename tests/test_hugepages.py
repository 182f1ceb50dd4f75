"""Weights moved onto 2 MiB pages (pipeline/host/hugepages.py): really collapsed, values kept."""

import os
import sys

import mlx.core as mx
import numpy as np
import pytest

from pipeline.host import hugepages

MiB = 2**20
pytestmark = pytest.mark.usefixtures("on_cpu")  # values and products compared bit for bit


def _kernel_at_least(major: int, minor: int) -> bool:
    try:
        parts = os.uname().release.split(".")
        return (int(parts[0]), int(parts[1].split("-")[0])) >= (major, minor)
    except (ValueError, IndexError):
        return False


needs_collapse = pytest.mark.skipif(
    sys.platform != "linux" or hugepages.thp_mode() in (None, "never")
    or not _kernel_at_least(6, 1),
    reason="needs Linux 6.1+ with transparent huge pages (madvise or always)")


@needs_collapse
def test_advise_collapses_weights_and_keeps_their_values(monkeypatch):
    monkeypatch.delenv("PIPELINE_HUGE_PAGES", raising=False)
    w = mx.random.normal((4096, 1024))  # 16 MiB
    x = mx.random.normal((3, 1024))
    mx.eval(w, x)
    before_values = np.array(w)
    before_product = np.array(x @ w.T)
    before_huge = hugepages.anon_huge_bytes()

    collapsed = hugepages.advise([w])

    # the 2 MiB-aligned middle of a 16 MiB buffer: at least 12 MiB, never more than 16
    assert 12 * MiB <= collapsed <= 16 * MiB
    assert collapsed % hugepages.HUGE_PAGE == 0
    # the kernel's own count of this process's huge pages went up by about as much
    assert hugepages.anon_huge_bytes() - before_huge >= collapsed - 2 * MiB
    assert np.array_equal(np.array(w), before_values)
    assert np.array_equal(np.array(x @ w.T), before_product)


@needs_collapse
def test_small_arrays_are_left_alone(monkeypatch):
    monkeypatch.delenv("PIPELINE_HUGE_PAGES", raising=False)
    small = [mx.ones((256, 1024)) for _ in range(4)]  # 1 MiB each: no whole aligned 2 MiB
    mx.eval(small)
    assert hugepages.advise(small) == 0


def test_turned_off_by_environment(monkeypatch):
    monkeypatch.setenv("PIPELINE_HUGE_PAGES", "0")
    w = mx.zeros((4096, 1024))
    mx.eval(w)
    assert not hugepages.wanted()
    assert hugepages.advise([w]) == 0


def test_aligned_range_stays_inside_the_buffer():
    w = mx.zeros((3000, 1000))
    mx.eval(w)
    view = np.frombuffer(w, dtype=np.uint8)
    start, end = view.ctypes.data, view.ctypes.data + view.nbytes
    lo, hi = hugepages._aligned_range(w)
    assert lo % hugepages.HUGE_PAGE == 0 and hi % hugepages.HUGE_PAGE == 0
    assert start <= lo and hi <= end
    assert lo - start < hugepages.HUGE_PAGE and end - hi < hugepages.HUGE_PAGE
