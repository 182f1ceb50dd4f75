"""Metal's wired limit (pipeline/host/wired.py): the decisions, over numbers and sysctl output,
and what a rank does after load on a CPU and (with MLX's Metal calls stood in for) on a Mac."""

import mlx.core as mx
import pytest

from pipeline.host import wired

GiB, MiB = 2**30, 2**20


def test_parse_wired_limit_mb():
    assert wired.parse_wired_limit_mb("0\n") == 0  # macOS's default
    assert wired.parse_wired_limit_mb("114688\n") == 114688
    assert wired.parse_wired_limit_mb("") is None  # no such sysctl (before macOS 14)
    assert wired.parse_wired_limit_mb(None) is None
    assert wired.parse_wired_limit_mb("sysctl: unknown oid 'iogpu.wired_limit_mb'") is None


def test_suggested_limit_leaves_macos_an_eighth():
    assert wired.suggested_wired_limit_mb(128 * GiB) == 114688
    assert wired.suggested_wired_limit_mb(192 * GiB) == 172032
    assert wired.suggested_wired_limit_mb(16 * GiB) == 12288  # at least 4 GiB left


def test_working_set_warning_at_90_percent():
    rec = int(107.5 * GiB)  # a 128 GiB Mac's stock recommended working set
    assert wired.working_set_warning(int(0.9 * rec), rec, 128 * GiB) is None
    note = wired.working_set_warning(100 * GiB, rec, 128 * GiB)
    assert note.startswith("its weights (100 GiB) are over 90% of Metal's recommended "
                           "working set (108 GiB), so decoding may be slow")
    assert "sudo sysctl iogpu.wired_limit_mb=114688" in note and "--split" in note
    # weights that fill the Mac: no sysctl value would do
    assert "sysctl" not in wired.working_set_warning(110 * GiB, 112 * GiB, 128 * GiB)


@pytest.mark.parametrize("weights, limit_mb, recommended, expected", [
    (60, 0, 96, None),                        # default limit, room left
    (90, 0, 96, "macOS's default, iogpu.wired_limit_mb=0"),
    (90, 98304, 96, "iogpu.wired_limit_mb=98304"),  # set to 3/4 of 128 GiB
    (90, 114688, 96, None),                   # raised by the user: the sysctl counts
    (90, None, None, None),                   # not a Mac GPU: nothing to say
])
def test_wired_limit_warning(weights, limit_mb, recommended, expected):
    note = wired.wired_limit_warning(weights * GiB, limit_mb,
                                     recommended and recommended * GiB, 128 * GiB)
    if expected is None:
        assert note is None
    else:
        assert note.startswith(f"its planned weights ({weights} GiB) are over 90% of the GPU "
                               f"wired limit") and expected in note
        assert "sudo sysctl iogpu.wired_limit_mb=114688" in note


def test_nothing_is_wired_without_metal(monkeypatch):
    def refuse(limit):
        raise AssertionError("set_wired_limit called without Metal")

    monkeypatch.setattr(mx.metal, "is_available", lambda: False)
    monkeypatch.setattr(mx, "set_wired_limit", refuse)
    assert wired.set_wired_limit(100 * GiB) is None


def test_on_metal_the_limit_becomes_the_recommended_working_set(monkeypatch):
    """What a Mac rank does after load; MLX's Metal calls stand in (no Metal here)."""
    calls = []
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(mx, "device_info", lambda: {
        "max_recommended_working_set_size": 48 * GiB, "memory_size": 64 * GiB})
    monkeypatch.setattr(mx, "set_wired_limit", lambda limit: calls.append(limit) or 0)
    assert wired.set_wired_limit(20 * GiB) is None
    assert calls == [48 * GiB]
    note = wired.set_wired_limit(47 * GiB)
    assert "recommended working set (48 GiB)" in note
    assert "iogpu.wired_limit_mb=57344" in note


def test_read_wired_limit_elsewhere_than_macos(monkeypatch):
    monkeypatch.setattr(wired.sys, "platform", "linux")
    assert wired.read_wired_limit_mb() is None
