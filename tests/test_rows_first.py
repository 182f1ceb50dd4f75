"""Fast paths on rank 0 that must not change a single token:
RowsFirstLinear (few-row products as (W @ x.T).T, used where the machine's check finds them
bitwise equal) and greedy_rows (argmax without logsumexp)."""

from __future__ import annotations

import os
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import pytest

from pipeline.host.blas import find_openblas
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


def check_tied_head(vocab: int, dim: int) -> None:
    """The tied head as Stage.logits takes it on a CPU, (E @ h.T).T, gives as_linear's logits
    exactly. (A [D, V] copy, h @ E.T-contiguous, would be faster still but is NOT equal for
    small shapes with OpenBLAS's small-matrix kernels, so it is not used.)"""
    emb = nn.Embedding(vocab, dim)
    for rows in (1, 2, 3, 4, 7, 16, 33, 64, ROWS_FIRST_MAX_ROWS):
        h = mx.random.normal((rows, dim))
        assert mx.array_equal((emb.weight @ h.T).T, emb.as_linear(h)).item(), (vocab, dim, rows)


HEADS = [(32000, 1024), (49152, 576), (256, 64), (1000, 128), (300, 48)]


def check_where_the_machine_says_exact() -> tuple[int, int]:
    """Every shape the machine's check (host/rows_first.py) calls exact is bitwise equal on
    other inputs and row counts too; returns (exact, not exact) shape counts."""
    from pipeline.host.rows_first import products_equal

    exact = other = 0
    for out_dim, in_dim in SHAPES:
        for bias in (False, True):
            if products_equal(out_dim, in_dim, bias, mx.float32):
                check_rows_first(out_dim, in_dim, bias)
                exact += 1
            else:
                other += 1
    for vocab, dim in HEADS:
        if products_equal(vocab, dim, False, mx.float32):
            check_tied_head(vocab, dim)
            exact += 1
        else:
            other += 1
    return exact, other


def test_rows_first_is_bitwise_equal_where_the_check_says_so_with_openblas():
    """Where the ranks use it: with OpenBLAS preloaded (it is only switched on there), one
    BLAS thread as in the tests' ranks. On some CPUs some shapes are not equal (an Intel Xeon
    with SkylakeX kernels at 64x64): those are left plain, and that is all this asserts."""
    lib = find_openblas()
    if lib is None:
        pytest.skip("OpenBLAS is not installed (apt-get install libopenblas0-pthread)")
    code = ("import mlx.core as mx; mx.set_default_device(mx.cpu)\n"
            "import tests.test_rows_first as t\n"
            "print('exact %d, not exact %d' % t.check_where_the_machine_says_exact())")
    env = dict(os.environ, LD_PRELOAD=lib, OPENBLAS_NUM_THREADS="1",
               PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "exact" in proc.stdout, proc.stderr[-3000:]
    print(proc.stdout)
    maps = subprocess.run([sys.executable, "-c", "import mlx.core; print(open('/proc/self/maps').read())"],
                          env=env, capture_output=True, text=True).stdout
    assert "openblas" in maps.lower()  # the check really ran on OpenBLAS


def test_the_check_catches_a_product_one_ulp_off(monkeypatch):
    from pipeline.host import rows_first
    from pipeline.model import stage

    assert rows_first.products_equal(64, 64, False, mx.float32, rows=(1, 2, 16))
    plain_call = stage.RowsFirstLinear.__call__
    monkeypatch.setattr(stage.RowsFirstLinear, "__call__", lambda self, x: mx.where(
        mx.arange(self["weight"].shape[0]) == 5, plain_call(self, x) * (1 + 2**-22),
        plain_call(self, x)))
    assert not rows_first.products_equal(64, 64, False, mx.float32, rows=(1, 2, 16))


def test_verdicts_are_cached_per_machine_and_shape(tmp_path):
    from pipeline.host.rows_first import CHECK_MAX_PARAMS, ExactShapes

    calls = []

    def check(out_dim, in_dim, bias, dtype):
        calls.append((out_dim, in_dim, bias))
        return out_dim != 64

    cache = tmp_path / "rows-first.json"
    exact = ExactShapes(check, cache)
    assert exact(128, 64, False, mx.float32) and not exact(64, 64, True, mx.float32)
    assert exact(128, 64, False, mx.float32)  # asked again: not checked again
    assert calls == [(128, 64, False), (64, 64, True)]
    again = ExactShapes(check, cache)  # another process on this machine: from the file
    assert again(128, 64, False, mx.float32) and not again(64, 64, True, mx.float32)
    assert again.checked == 0 and len(calls) == 2
    assert not exact(CHECK_MAX_PARAMS, 2, False, mx.float32)  # too big to check: plain
    assert len(calls) == 2


def test_use_rows_first_switches_only_the_exact_shapes(model_dir):
    from pipeline.model.load import load_stage, read_config
    from pipeline.host.rows_first import use_rows_first

    path = model_dir("tiny-llama")
    config = read_config(path)
    stage = load_stage(path, config, (0, config["num_hidden_layers"]), with_head=True)
    hidden = config["hidden_size"]
    square = lambda out_dim, in_dim, bias, dtype: out_dim == in_dim == hidden  # noqa: E731
    switched, plain = use_rows_first(stage, exact=square)
    kinds = [type(m) for layer in stage.layers for _, m in layer.named_modules()
             if isinstance(m, nn.Linear)]
    assert switched == sum(k is RowsFirstLinear for k in kinds) > 0
    assert plain == sum(k is nn.Linear for k in kinds) > 0
    assert not stage.rows_first  # the tied head is vocab x hidden: not square, left plain


@pytest.mark.parametrize("out_dim,in_dim", SHAPES[:5])
def test_rows_first_is_bitwise_equal_where_the_check_says_so_here(out_dim, in_dim):
    """And with whatever BLAS this test process has (the reference one by default)."""
    from pipeline.host.rows_first import products_equal

    for bias in (False, True):
        if products_equal(out_dim, in_dim, bias, mx.float32):
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
