"""Pure placement decisions: how many layers each rank runs. No MPI, no MLX."""

from __future__ import annotations

from itertools import accumulate


class SplitError(ValueError):
    pass


def layer_ranges(split: list[int]) -> list[tuple[int, int]]:
    """[3, 4] -> [(0, 3), (3, 7)]: the contiguous layer range of each rank."""
    ends = list(accumulate(split))
    return [(end - n, end) for n, end in zip(split, ends)]


def parse_split(text: str, num_layers: int, size: int) -> list[int]:
    """Parse `--split 10,12,8` and check it against the model and the rank count."""
    try:
        split = [int(part) for part in text.split(",")]
    except ValueError:
        raise SplitError(
            f"--split '{text}' is not a comma-separated list of layer counts (e.g. 10,12,8)"
        ) from None
    if len(split) != size:
        raise SplitError(
            f"--split '{text}' has {len(split)} entries but the job has {size} ranks: "
            f"give one layer count per rank"
        )
    if any(n < 1 for n in split):
        raise SplitError(f"--split '{text}': every rank needs at least one layer")
    if sum(split) != num_layers:
        raise SplitError(
            f"--split '{text}' sums to {sum(split)} but the model has {num_layers} layers"
        )
    return split


def check_rank_count(num_layers: int, size: int) -> None:
    if size > num_layers:
        raise SplitError(
            f"{size} ranks but the model has only {num_layers} layers: "
            f"run at most {num_layers} ranks (mpirun -np {num_layers})"
        )


def balanced_split(layer_bytes: list[int], size: int, first_extra: int = 0) -> list[int]:
    """Contiguous split minimizing the largest rank's bytes.

    `first_extra` is what rank 0 holds besides its layers (embedding, final norm, head), so
    rank 0 gets fewer layers when the head is large. Every rank gets at least one layer.
    Dynamic programming over (ranks, layers); models have at most a few hundred layers.
    """
    n = len(layer_bytes)
    check_rank_count(n, size)
    prefix = [0, *accumulate(layer_bytes)]
    inf = (float("inf"), float("inf"))
    # best[r][i]: (largest load, sum of squared loads) placing the first i layers on ranks
    # 0..r-1; the squares break ties between equally large maxima towards even loads.
    best = [[inf] * (n + 1) for _ in range(size + 1)]
    cut = [[0] * (n + 1) for _ in range(size + 1)]
    best[0][0] = (0, 0)
    for r in range(1, size + 1):
        extra = first_extra if r == 1 else 0
        for i in range(r, n - (size - r) + 1):
            for j in range(r - 1, i):
                load = prefix[i] - prefix[j] + extra
                prev_max, prev_sq = best[r - 1][j]
                cost = (max(prev_max, load), prev_sq + load * load)
                if cost < best[r][i]:
                    best[r][i], cut[r][i] = cost, j
    split, i = [], n
    for r in range(size, 0, -1):
        j = cut[r][i]
        split.append(i - j)
        i = j
    return split[::-1]
