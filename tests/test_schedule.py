"""The micro-batch schedule is data: checked without MPI for deadlock freedom and utilisation."""

import pytest

from pipeline.schedule import simulate, stage_program


@pytest.mark.parametrize("stages", range(1, 7))
@pytest.mark.parametrize("microbatches", [1, 2, 3, 4, 8, 16])
def test_no_deadlock_and_every_send_received(stages, microbatches):
    steps = 5
    timeline = simulate(stages, microbatches, steps)  # raises on deadlock / misordering
    sends = sum(i.kind == "send" for r in range(stages)
                for i in stage_program(r, stages, microbatches, steps))
    recvs = sum(i.kind == "recv" for r in range(stages)
                for i in stage_program(r, stages, microbatches, steps))
    assert sends == recvs
    assert timeline.end_time > 0


@pytest.mark.parametrize("stages", range(2, 7))
@pytest.mark.parametrize("microbatches", [1, 2, 3, 4, 8, 16])
def test_full_utilisation_once_the_pipe_is_full(stages, microbatches):
    steps = 40
    t = simulate(stages, microbatches, steps)
    # steady state: skip the fill (first round) and the drain (last round)
    start, end = stages + microbatches, t.end_time - stages - microbatches
    for rank in range(stages):
        u = t.utilisation(rank, start, end)
        if microbatches >= stages:
            assert u == pytest.approx(1.0)
        else:  # too few micro-batches: each stage idles while the others work
            assert u == pytest.approx(microbatches / stages, abs=0.05)


def test_rank0_samples_every_microbatch_every_step():
    prog = list(stage_program(0, 3, 4, 6))
    samples = [i.mb for i in prog if i.kind == "sample"]
    assert samples == [0, 1, 2, 3] * 6


def test_one_stage_needs_no_messages():
    assert all(i.kind not in ("send", "recv") for i in stage_program(0, 1, 3, 4))
