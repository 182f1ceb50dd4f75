"""launch/chaos-batch, short: a 40-prompt batch killed (kill -9 of a random rank) while it
loads and mid-run at 2 ranks and mid-run at 3, resumed each time with the same command, ends
with every prompt once and the fault-free run's completions (the script checks every step;
this test checks its report and the final files again on its own)."""

import json
import sys

import pytest

from helpers import launch_script

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")]


def test_chaos_batch_loses_and_repeats_nothing(model_dir, tmp_path):
    chaos = launch_script("chaos-batch")
    report = chaos.main(["--np", "2,3", "--faults", "2,1", "--prompts", "40", "--max-tokens", "16",
                         "--concurrency", "8", "--model", str(model_dir("tiny-llama")),
                         "--work", str(tmp_path)])
    two, three = report["runs"]
    assert (two["faults"], three["faults"]) == (2, 1)
    assert two["faults_while_loading"] >= 1  # the first fault hit before any result
    for run in (two, three):
        assert all(rc != 0 for rc in run["killed_exit_codes"])
        assert run["steps"][-1]["rc"] == 0 and run["steps"][-1]["fault"] is None
        killed_mid_run = [s for s in run["steps"] if s.get("results_at_kill", 0) > 0]
        assert killed_mid_run and all(s["results_after"] < 40 for s in killed_mid_run)

    reference = [json.loads(line) for line in (tmp_path / "reference.jsonl").read_text().splitlines()]
    assert len(reference) == 40
    assert sum(len(r["completion_ids"]) for r in reference) > 200  # not a degenerate batch
    expected = {r["id"]: (r["completion"], r["completion_ids"]) for r in reference}
    for np_ in (2, 3):
        lines = (tmp_path / f"chaos-{np_}.jsonl").read_text().splitlines()
        got = [json.loads(line) for line in lines]
        assert sorted(r["id"] for r in got) == sorted(expected)  # each once
        assert {r["id"]: (r["completion"], r["completion_ids"]) for r in got} == expected
