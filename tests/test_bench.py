"""Smoke run of `bench` (tiny model, one repeat): the JSON holds sane figures for every rank."""

import json

from conftest import run_pipeline


def test_bench_smoke(model_dir, tmp_path):
    out = tmp_path / "bench.json"
    proc = run_pipeline(2, "bench", "--model", str(model_dir("tiny-llama")), "--prompt-tokens", "8",
                        "--gen-tokens", "6", "--concurrency", "1,4", "--repeats", "1", "--warmup",
                        "0", "--prefill-tokens", "40", "--prefill-chunks", "8,40", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    assert [d["concurrency"] for d in r["decode"]] == [1, 4]
    for d in r["decode"]:
        assert d["decode_tps"]["median"] > 0 and d["ttft_s"]["min"] <= d["ttft_s"]["max"]
        assert abs(d["decode_tps_per_seq"] * d["concurrency"] - d["decode_tps"]["median"]) < 1e-6
    assert [p["chunk"] for p in r["prefill"]] == [8, 40] and r["prefill"][0]["time_s"]["median"] > 0
    assert r["machine"]["ranks"] == 2 and r["machine"]["blas"] and r["machine"]["mlx"]
    assert [x["rank"] for x in r["ranks"]] == [0, 1]
    assert all(x["compute_s"] > 0 and x["bytes_sent"] > 0 for x in r["ranks"])
    assert "| prompt | concurrency |" in proc.stdout  # the markdown table
