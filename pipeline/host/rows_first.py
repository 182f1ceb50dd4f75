"""Is the rows-first product (stage.RowsFirstLinear) bitwise equal to nn.Linear's on this machine?

Whether `(W @ x.T).T` sums each dot product in the order `x @ W.T` does depends on the BLAS
and its kernels: equal on the AMD boxes measured, not on an Intel Xeon with OpenBLAS's
SkylakeX small-matrix kernels at some shapes. So it is checked here, on the machine that runs
it, for each (out, in, bias, dtype) a stage holds, at every row count up to 16 (decode) and a
sample above, and used only where every product was equal. Verdicts are cached per CPU, BLAS,
thread count and mlx version in $PIPELINE_CACHE/rows-first.json.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from pipeline.host.blas_kernels import load_verdicts, save_verdicts
from pipeline.model.spec import cache_root
from pipeline.model.stage import RowsFirstLinear, RowsFirstShardedToAll, Stage

# row counts compared: every decode batch up to 16, then a sample up to ROWS_FIRST_MAX_ROWS
ROWS_CHECKED = (*range(1, 17), 24, 31, 33, 64, 100, 128, 255)
CHECK_MAX_PARAMS = 1 << 26  # a larger product is left plain: checking it would take seconds


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key() -> str:
    """What the verdicts depend on besides the shape."""
    from pipeline.host.blas import describe

    return "|".join((_cpu_model(), describe()[1], os.environ.get("OPENBLAS_NUM_THREADS", ""),
                     mx.__version__))


def products_equal(out_dim: int, in_dim: int, bias: bool, dtype, rows=ROWS_CHECKED) -> bool:
    """Compare RowsFirstLinear with nn.Linear over random weights and inputs of this shape."""
    key = mx.random.key(out_dim * 31 + in_dim)
    wkey, xkey = mx.random.split(key)
    plain = nn.Linear(in_dim, out_dim, bias=bias)
    plain.update({"weight": mx.random.normal((out_dim, in_dim), key=wkey).astype(dtype)})
    if bias:
        plain.update({"bias": mx.random.normal((out_dim,), key=xkey).astype(dtype)})
    fast = nn.Linear(in_dim, out_dim, bias=bias)
    fast.update(plain.parameters())
    fast.__class__ = RowsFirstLinear
    x = mx.random.normal((max(rows), in_dim), key=xkey).astype(dtype)
    for n in rows:
        if not mx.array_equal(plain(x[:n]), fast(x[:n])).item():
            return False
    return True


class ExactShapes:
    """Verdicts for one machine: `self(out, in, bias, dtype)` says whether rows first is exact."""

    def __init__(self, check=products_equal, cache: Path | None = None):
        self.check, self.path = check, cache or cache_root() / "rows-first.json"
        self.machine = machine_key()
        self.known = load_verdicts(self.path)
        self.checked = 0  # shapes compared in this process (not taken from the cache)

    def __call__(self, out_dim: int, in_dim: int, bias: bool, dtype) -> bool:
        if out_dim * in_dim > CHECK_MAX_PARAMS:
            return False
        key = f"{self.machine}|{out_dim}x{in_dim}|{int(bias)}|{dtype}"
        if key not in self.known:
            self.known[key] = self.check(out_dim, in_dim, bias, dtype)
            self.checked += 1
            save_verdicts(self.path, self.known)
        return bool(self.known[key])


def use_rows_first(stage: Stage, exact=None) -> tuple[int, int]:
    """Switch the stage's float linear layers (and the tied head) to RowsFirstLinear where
    `exact(out, in, bias, dtype)` says the two products are bitwise equal here (default: the
    machine's check, ExactShapes); returns (layers switched, layers left plain).
    Quantized layers are left alone; a tensor-parallel group's split layers are switched too
    (their forward is a plain product, or one then the sum)."""
    from mlx.nn.layers.distributed import AllToShardedLinear, ShardedToAllLinear

    if exact is None:
        exact = ExactShapes()
    switched = plain = 0
    modules = [m for layer in stage.layers for _, m in layer.named_modules()]
    if stage.lm_head is not None:
        modules.append(stage.lm_head)
    if stage.head_share is not None:
        modules.append(stage.head_share)
    for m in modules:
        kind = {nn.Linear: RowsFirstLinear, AllToShardedLinear: RowsFirstLinear,  # x @ W.T (+ b)
                ShardedToAllLinear: RowsFirstShardedToAll}.get(type(m))
        if kind is None:
            continue
        w = m["weight"]
        if exact(*w.shape, "bias" in m, w.dtype):
            m.__class__ = kind
            switched += 1
        else:
            plain += 1
    tied = stage.head if stage.vocab is None else stage.vocab.embedding  # used as the head?
    if type(tied) is nn.Embedding and exact(*tied.weight.shape, False, tied.weight.dtype):
        stage.rows_first = True
        if stage.vocab is not None:
            stage.vocab.rows_first = True
    return switched, plain
