"""Layer ranges and the user's --split, checked. No MPI, no MLX (the planner: planner.py)."""

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
