"""Smoke run of `bench` (tiny model, one repeat): the JSON holds sane figures for every rank and
hop, --plot draws a PNG, and bench-links' table is built from such JSON (no long benchmark here)."""

import copy
import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, run_pipeline
from helpers import launch_script

HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def smoke(model_dir, tmp_path_factory):
    """One 2-rank bench run: (process, results, plot path or None)."""
    tmp = tmp_path_factory.mktemp("bench")
    out, png = tmp / "bench.json", tmp / "bench.png"
    plot = ["--plot", str(png)] if HAVE_MATPLOTLIB else []
    proc = run_pipeline(2, "bench", "--model", str(model_dir("tiny-llama")), "--prompt-tokens", "8",
                        "--gen-tokens", "6", "--concurrency", "1,4", "--repeats", "1", "--warmup",
                        "0", "--prefill-tokens", "40", "--prefill-chunks", "8,40", "--label", "smoke",
                        "--json", str(out), *plot)
    assert proc.returncode == 0, proc.stderr
    return proc, json.loads(out.read_text()), png if plot else None


def test_bench_smoke(smoke):
    proc, r, _ = smoke
    assert [d["concurrency"] for d in r["decode"]] == [1, 4]
    for d in r["decode"]:
        assert d["decode_tps"]["median"] > 0 and d["ttft_s"]["min"] <= d["ttft_s"]["max"]
        assert abs(d["decode_tps_per_seq"] * d["concurrency"] - d["decode_tps"]["median"]) < 1e-6
    assert [p["chunk"] for p in r["prefill"]] == [8, 40] and r["prefill"][0]["time_s"]["median"] > 0
    assert r["machine"]["ranks"] == 2 and r["machine"]["blas"] and r["machine"]["mlx"]
    assert [x["rank"] for x in r["ranks"]] == [0, 1]
    assert all(x["compute_s"] > 0 and x["bytes_sent"] > 0 for x in r["ranks"])
    assert r["label"] == "smoke" and r["repeats"] == 1
    assert len(r["machine"]["load_avg"]) == len(r["machine"]["load_avg_end"]) == 3  # Linux, macOS
    assert "| prompt | concurrency |" in proc.stdout  # the markdown table


def test_bench_hops(smoke):
    """Per hop: the bytes bench sent over it and the link's ping-pong bandwidth and latency."""
    proc, r, _ = smoke
    m = r["machine"]
    assert m["hidden_size"] == 64 and m["activation_dtype"] == "float32"
    assert m["bytes_per_token"] == 64 * 4
    hops = r["hops"]
    assert [(h["from"], h["to"]) for h in hops] == [(0, 1), (1, 0)]
    sent = {x["rank"]: x["bytes_sent"] for x in r["ranks"]}
    for h in hops:
        assert h["bytes"] == sent[h["from"]] > 0
        assert h["gbps"] > 0 and h["latency_us"] > 0 and h["probe_bytes"] == 4 * 2**20
        assert h["link_s"] == pytest.approx(h["bytes"] * 8 / (h["gbps"] * 1e9))
    # every activation of the prompts and of each decode step crossed hop 0 -> 1
    assert sent[0] >= m["bytes_per_token"] * (8 + 4 * 8 + 40)
    assert "| hop | bytes sent | link Gbit/s" in proc.stdout and "| 0 -> 1 |" in proc.stdout


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="matplotlib is not installed (make install adds it)")
def test_bench_plot(smoke, tmp_path):
    """--plot draws one run; --from-json draws several against their labels, without mpirun."""
    _, r, png = smoke
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000
    runs = []
    for label in ("1gbe", "tb4"):
        run = copy.deepcopy(r)
        run["label"] = label
        path = tmp_path / f"{label}.json"
        path.write_text(json.dumps(run))
        runs.append(str(path))
    many = tmp_path / "links.png"
    proc = run_pipeline(0, "bench", "--from-json", ",".join(runs), "--plot", str(many))
    assert proc.returncode == 0, proc.stderr
    assert many.read_bytes()[:8] == PNG_MAGIC and many.stat().st_size > 10_000


def test_bench_from_json_errors(tmp_path):
    proc = run_pipeline(0, "bench", "--from-json", str(tmp_path / "missing.json"), "--plot",
                        str(tmp_path / "x.png"))
    assert proc.returncode == 2 and proc.stderr.startswith("pipeline: error: cannot read")
    (tmp_path / "other.json").write_text('{"a": 1}')
    proc = run_pipeline(0, "bench", "--from-json", str(tmp_path / "other.json"), "--plot",
                        str(tmp_path / "x.png"))
    assert proc.returncode == 2 and "is not the JSON of `bench --json`" in proc.stderr
    proc = run_pipeline(0, "bench", "--from-json", str(tmp_path / "other.json"))
    assert proc.returncode == 2 and "add --plot" in proc.stderr
    assert not (tmp_path / "x.png").exists()


def _bench_links():
    return launch_script("bench-links")


def test_bench_compare_commands_on_linux_and_macos(monkeypatch):
    """macOS has no taskset and Open MPI cannot bind there; its libmpi is a .dylib."""
    bc = launch_script("bench-compare")
    monkeypatch.setattr(bc.shutil, "which", lambda name: f"/usr/bin/{name}")
    linux = bc.mpirun(2, "python", "-m", "pipeline", platform="linux")
    assert linux[linux.index("--bind-to") + 1] == "core" and "LD_PRELOAD" in linux
    assert linux[-3:] == ["python", "-m", "pipeline"]
    assert bc.pin_one_core("linux") == ["taskset", "-c", "0"]
    assert bc.env("linux")["MLX_MPI_LIBNAME"].endswith("/.venv/lib/libmpi.so.40")

    mac = bc.mpirun(2, "python", "-m", "pipeline", platform="darwin")
    assert mac[mac.index("--bind-to") + 1] == "none" and "core" not in mac
    assert "LD_PRELOAD" not in mac and mac[-3:] == ["python", "-m", "pipeline"]
    assert bc.pin_one_core("darwin") == []
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    mac_env = bc.env("darwin")
    assert mac_env["MLX_MPI_LIBNAME"].endswith("/.venv/lib/libmpi.40.dylib")
    assert "LD_PRELOAD" not in mac_env
    assert bc.per_rank("darwin") != bc.per_rank("linux") == "1 core per rank"


def test_bench_compare_regret_lines():
    bc = launch_script("bench-compare")
    decode = {"default": {1: 10.0, 32: 90.0}, "tp": {1: 10.2, 32: 100.0},
              "pp": {1: 6.0, 32: 90.0}}
    lines = bc.regret_lines([1, 32], decode, {1: "tp 2", 32: "pipeline"})
    assert "- 1 sequences: chose tp 2 (10.0 tok/s), fastest tp 2 (10.2): regret 2.0% (met)" in lines
    assert "- 32 sequences: chose pipeline (90.0 tok/s), fastest tp 2 (100.0): regret 11.1% " \
           "(NOT met)" in lines


def test_bench_compare_gives_the_peers_the_ranks_kernels(tmp_path):
    """mlx-lm runs with the OpenBLAS kernels a rank would choose (a Prescott fallback
    corrected), so the comparison is fair. (A fresh process: one that has loaded OpenBLAS
    already reports the kernels it loaded with.)"""
    from pipeline.host import blas_kernels

    bc = launch_script("bench-compare")
    if not os.path.exists(bc.OPENBLAS):
        pytest.skip("OpenBLAS is not installed")
    with open("/proc/cpuinfo") as f:
        vendor, _, flags = blas_kernels.cpu_facts(f.read())
    want = blas_kernels.correction("Prescott", vendor, flags) or "Prescott"
    code = ("import importlib.machinery as m, importlib.util as u, sys\n"
            f"loader = m.SourceFileLoader('bc', {str(ROOT / 'launch' / 'bench-compare')!r})\n"
            "mod = u.module_from_spec(u.spec_from_loader('bc', loader)); loader.exec_module(mod)\n"
            "print(mod.env('linux').get('OPENBLAS_CORETYPE'))")
    env = dict(os.environ, OPENBLAS_CORETYPE="Prescott", PIPELINE_CACHE=str(tmp_path))
    env.pop("LD_PRELOAD", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [want]


def test_bench_links_table(smoke, tmp_path):
    """bench-links' table from real bench JSON: one row per link, ratios against tb4."""
    bl = _bench_links()
    _, r, _ = smoke
    rows = []
    for label, scale in (("1gbe", 0.5), ("tb4", 1.0)):
        run = copy.deepcopy(r)
        run["label"] = label
        for d in run["decode"]:
            d["decode_tps"]["median"] *= scale
        for h in run["hops"]:
            h["gbps"] = 0.94 if label == "1gbe" else 14.5
        rows.append(bl.summarize(run, [1, 4]))
        (tmp_path / f"{label}.json").write_text(json.dumps(run))
    assert rows[0]["link_s"] == max(h["link_s"] for h in r["hops"])
    assert rows[0]["decode_lo"] == pytest.approx(rows[1]["decode_lo"] * 0.5)
    assert rows[0]["hops"] == [(0, 1, 0.94), (1, 0, 0.94)]
    assert rows[1]["prefill_tps"] == pytest.approx(
        max(40 / p["time_s"]["median"] for p in r["prefill"]))
    lines = bl.table(rows, [1, 4]).splitlines()
    assert lines[0].startswith("| link | hop Gbit/s") and "decode c=4 vs tb4" in lines[0]
    assert len(lines) == 4
    one, tb4 = (line.split(" | ") for line in lines[2:])
    assert one[0] == "| 1gbe" and one[1] == "0->1 0.94, 1->0 0.94"
    assert one[-2:] == ["0.50x", "0.50x |"] and tb4[-2:] == ["1.00x", "1.00x |"]
    with pytest.raises(ValueError, match="concurrency"):
        bl.summarize(r, [1, 8])
    with pytest.raises(SystemExit):
        bl.parse_args(["--links", "1gbe,wifi"])
    a = bl.parse_args(["--links", "1gbe, tb4", "--concurrency", "2,16"])
    assert a.links == ["1gbe", "tb4"] and a.concurrency == [2, 16]
    assert [bl.even_split(30, 2), bl.even_split(30, 4), bl.even_split(7, 3)] == ["15,15", "7,7,8,8",
                                                                                 "2,2,3"]
    # --no-run: the table again from saved JSON, no root or cluster needed
    cmd = [sys.executable, str(ROOT / "launch" / "bench-links"), "--no-run", "--links", "1gbe,tb4",
           "--concurrency", "1,4", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "| 1gbe | 0->1 0.94, 1->0 0.94 |" in proc.stdout and "| tb4 | 0->1 14.50" in proc.stdout
    assert (tmp_path / "links.md").read_text().strip() == proc.stdout.strip()
    proc = subprocess.run([*cmd[:-1], str(tmp_path / "none")], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("bench-links: error: --no-run: no ")


def test_bench_prefix_cache(model_dir, tmp_path):
    """`bench --prefix-cache` at 2 ranks: the same greedy answers with the cache and without,
    the shared system prompt taken from the cache from the second conversation on, a later
    turn's prompt all but its new message, and the ratios #26 names."""
    out = tmp_path / "cache.json"
    proc = run_pipeline(2, "bench", "--prefix-cache", "--model", str(model_dir("tiny-llama")),
                        "--conversations", "3", "--turns", "2", "--system-tokens", "120",
                        "--user-tokens", "10", "--gen-tokens", "5", "--concurrency", "4",
                        "--repeats", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    assert r["same_answers"] and "identical: yes" in proc.stdout
    first, second = r["on"]
    assert [t["cached_tokens"] for t in r["off"]] == [0, 0]
    assert first["cached_tokens"] >= 2 * 120  # conversations 2 and 3 reuse the system prompt
    # turn 2: each conversation's turn-1 prompt from the cache (its resent answer is a fixed
    # text, not the model's), so only the answer and the new message are prefilled
    assert second["cached_tokens"] >= first["prompt_tokens"] - 3
    assert second["prompt_tokens"] - second["cached_tokens"] <= 3 * (5 + 30)
    assert r["prompt_cache"]["hits"] == 5 and r["prompt_cache"]["misses"] == 1
    assert r["later_ttft_ratio"] > 0 and r["aggregate_ratio"] > 0
    assert "goal <= 0.25x" in proc.stdout and "goal <= 0.5x" in proc.stdout
    bad = run_pipeline(1, "bench", "--prefix-cache", "--model", str(model_dir("tiny-llama")),
                       "--turns", "1")
    assert bad.returncode != 0 and "--turns of at least 2" in bad.stderr
