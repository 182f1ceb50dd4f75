"""--split parsing and layer ranges (the planner itself: test_planner.py)."""

import pytest

from pipeline.place.split import SplitError, layer_ranges, parse_split


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
