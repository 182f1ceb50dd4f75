"""The layer split is a pure function: checked without MPI, over many sizes."""

import pytest

from pipeline.plan import SplitError, balanced_split, layer_ranges, parse_split


@pytest.mark.parametrize("layers", [1, 2, 7, 30, 80])
@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_balanced_split_covers_every_layer(layers, size):
    if size > layers:
        with pytest.raises(SplitError, match="at most"):
            balanced_split([1] * layers, size)
        return
    split = balanced_split([1] * layers, size)
    assert sum(split) == layers and len(split) == size and min(split) >= 1
    assert max(split) - min(split) <= 1  # equal layers: as even as possible


def test_head_bytes_count_on_rank_zero():
    # 30 layers of 10 bytes; rank 0 also holds a 100-byte embedding/head.
    split = balanced_split([10] * 30, 2, first_extra=100)
    assert split == [10, 20]  # 200 bytes each


def test_split_minimizes_the_largest_rank():
    sizes = [5, 1, 1, 1, 1, 5, 5, 1]
    split = balanced_split(sizes, 3)
    loads = [sum(sizes[a:b]) for a, b in layer_ranges(split)]
    assert max(loads) == 7  # best possible: [5,1,1] [1,1,5] [5,1]


def test_layer_ranges():
    assert layer_ranges([3, 4]) == [(0, 3), (3, 7)]


@pytest.mark.parametrize("text, message", [
    ("3,3", "sums to 6 but the model has 7 layers"),
    ("7", "has 1 entries but the job has 2 ranks"),
    ("7,0", "at least one layer"),
    ("a,b", "not a comma-separated list"),
])
def test_parse_split_errors(text, message):
    with pytest.raises(SplitError, match=message):
        parse_split(text, 7, 2)


def test_parse_split_ok():
    assert parse_split("2,5", 7, 2) == [2, 5]
