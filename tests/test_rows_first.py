"""Fast paths on rank 0 that must not change a single token:
RowsFirstLinear (few-row products as (W @ x.T).T) and greedy_rows (argmax without logsumexp)."""

from __future__ import annotations

import os
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import pytest

from pipeline.exec.blas import find_openblas
from pipeline.exec.head import greedy_rows
from pipeline.exec.sampling import logprobs_of
from pipeline.model.stage import ROWS_FIRST_MAX_ROWS, RowsFirstLinear

from conftest import ROOT

pytestmark = pytest.mark.usefixtures("on_cpu")  # bitwise comparisons: the CPU's products

# (out, in) of the linear layers of the test and benchmark models, and odd ones
SHAPES = [(64, 64), (176, 64), (64, 176), (256, 64), (1024, 1024), (2816, 1024),
          (1024, 2816), (128, 1024), (1536, 576), (576, 1536), (32000, 1024)]


def check_rows_first(out_dim: int, in_dim: int, bias: bool) -> None:
    mx.random.seed(out_dim * 7 + in_dim + bias)
    plain = nn.Linear(in_dim, out_dim, bias=bias)
    fast = nn.Linear(in_dim, out_dim, bias=bias)
    fast.update(plain.parameters())
    fast.__class__ = RowsFirstLinear
    for batch, length in [(1, 1), (2, 1), (7, 1), (16, 1), (33, 1), (1, 5), (1, 128), (3, 40),
                          (1, ROWS_FIRST_MAX_ROWS + 1)]:
        x = mx.random.normal((batch, length, in_dim))
        a, b = plain(x), fast(x)
        assert a.shape == b.shape == (batch, length, out_dim)
        assert mx.array_equal(a, b).item(), (out_dim, in_dim, bias, batch, length)


def check_tied_head() -> None:
    """The tied head as Stage.logits takes it on a CPU, (E @ h.T).T, gives as_linear's logits
    exactly. (A [D, V] copy, h @ E.T-contiguous, would be faster still but is NOT equal for
    small shapes with OpenBLAS's small-matrix kernels, so it is not used.)"""
    for vocab, dim in [(32000, 1024), (49152, 576), (256, 64), (1000, 128), (300, 48)]:
        emb = nn.Embedding(vocab, dim)
        for rows in (1, 2, 3, 4, 7, 16, 33, 64, ROWS_FIRST_MAX_ROWS):
            h = mx.random.normal((rows, dim))
            assert mx.array_equal((emb.weight @ h.T).T, emb.as_linear(h)).item(), (vocab, dim, rows)


def test_rows_first_linear_is_bitwise_equal_with_openblas():
    """Where the ranks use it: with OpenBLAS preloaded (it is only switched on there)."""
    lib = find_openblas()
    if lib is None:
        pytest.skip("OpenBLAS is not installed (apt-get install libopenblas0-pthread)")
    code = ("import mlx.core as mx; mx.set_default_device(mx.cpu)\n"
            "import tests.test_rows_first as t\n"
            "for s in t.SHAPES:\n"
            "    for bias in (False, True): t.check_rows_first(*s, bias)\n"
            "t.check_tied_head()\n"
            "print('all equal')")
    env = dict(os.environ, LD_PRELOAD=lib, OPENBLAS_NUM_THREADS="1",
               PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "all equal" in proc.stdout, proc.stderr[-3000:]
    maps = subprocess.run([sys.executable, "-c", "import mlx.core; print(open('/proc/self/maps').read())"],
                          env=env, capture_output=True, text=True).stdout
    assert "openblas" in maps.lower()  # the check really ran on OpenBLAS


@pytest.mark.parametrize("out_dim,in_dim", SHAPES[:5])
def test_rows_first_linear_is_bitwise_equal_here(out_dim, in_dim):
    """And with whatever BLAS this test process has (the reference one by default)."""
    for bias in (False, True):
        check_rows_first(out_dim, in_dim, bias)


def test_greedy_rows_matches_argmax_of_logprobs():
    mx.random.seed(0)
    logits = mx.random.normal((64, 32000)) * 5
    tokens, near = greedy_rows(logits)
    assert tokens == mx.argmax(logprobs_of(logits), axis=-1).tolist()
    assert not any(near)


def test_greedy_rows_flags_near_ties():
    import numpy as np

    row = np.zeros((1, 1000), np.float32)
    # two values three ulps apart at the top: rounding after "- logsumexp" may merge them
    row[0, 20] = 3.0
    row[0, 10] = np.nextafter(np.nextafter(np.nextafter(np.float32(3.0), 0), 0), 0)
    assert greedy_rows(mx.array(row)) == ([20], [True])
    row[0, 10] = 2.0  # a clear winner
    assert greedy_rows(mx.array(row)) == ([20], [False])
