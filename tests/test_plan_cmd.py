"""`python -m pipeline plan`: from declared capacities (no mpirun) and measured ones (mpirun)."""

import json
import socket
import subprocess
import sys

import pytest

from conftest import MPIRUN, ROOT, mpi_env, run_pipeline

GiB = 2**30
LLAMA_70B_4BIT = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=8192,
                      num_hidden_layers=80, intermediate_size=28672, num_attention_heads=64,
                      num_key_value_heads=8, rms_norm_eps=1e-5, vocab_size=128256,
                      rope_theta=5e5, max_position_embeddings=131072, torch_dtype="bfloat16",
                      tie_word_embeddings=False, quantization={"group_size": 64, "bits": 4})


@pytest.fixture
def config_only_70b(tmp_path):
    """A folder holding only config.json: planning needs no weights."""
    folder = tmp_path / "llama-70b-4bit"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA_70B_4BIT))
    return folder


def plan_json(np_, *args):
    proc = run_pipeline(np_, "plan", *args, "--json", timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def check_ranges(doc, num_layers):
    """Stages (consecutive ranks, one per stage or a tensor-parallel group's) cover the layers
    in order; a group's ranks share their stage's range."""
    ranks = doc["ranks"]
    assert [r["rank"] for r in ranks] == list(range(len(ranks)))
    assert ranks[0]["layer_range"][0] == 0 and ranks[-1]["layer_range"][1] == num_layers
    for a, b in zip(ranks, ranks[1:]):
        assert a["layer_range"][1] == b["layer_range"][0] or a["layer_range"] == b["layer_range"]
    for r in ranks:
        assert r["layers"] == r["layer_range"][1] - r["layer_range"][0] >= 1
        assert r["weight_bytes"] + r["kv_bytes"] + r["headroom_bytes"] <= r["usable_bytes"]


def test_table_from_config_and_tb4(config_only_70b):
    proc = run_pipeline(0, "plan", "--model", str(config_only_70b), "--hostfile", "hostfiles/tb4",
                        "--max-context", "8192", timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "llama 80 layers, hidden 8192, vocab 128256, separate head, 4-bit" in out
    assert "from config.json shapes" in out and "declared in hostfiles/tb4" in out
    assert "max context 8192 tokens, memory fraction 0.8" in out
    rows = {line.split()[0]: line for line in out.splitlines()
            if line.strip() and line.split()[0] in {"0", "1", "2", "total"}}
    assert "192.168.1.1 (Mac mini (hub), M4 Pro)" in rows["0"] and "273 GB/s" in rows["0"]
    assert "192.168.1.20 (MacBook Pro, M4 Max)" in rows["1"] and "128 GiB" in rows["1"]
    assert "192.168.1.30 (Mac Studio, M2 Ultra)" in rows["2"] and "800 GB/s" in rows["2"]
    assert rows["total"].split()[1] == "80"  # every layer placed
    assert "2.5 GiB" in rows["total"]  # KV: 2 x 80 layers x 8 heads x 128 x 2 bytes x 8192
    assert "tokens/s bound:" in out
    # 3/4 of the 128256 rows, rounded up to a multiple of 128
    assert "the last rank also holds the head's first 96256 of 128256 rows" in out


def test_json_from_config_and_tb4(config_only_70b):
    doc = plan_json(0, "--model", str(config_only_70b), "--hostfile", "hostfiles/tb4",
                    "--max-context", "8192")
    check_ranges(doc, 80)
    ranks = doc["ranks"]
    assert [r["host"] for r in ranks] == ["192.168.1.1", "192.168.1.20", "192.168.1.30"]
    assert [r["memory_bytes"] // GiB for r in ranks] == [64, 128, 192]
    assert sum(r["kv_bytes"] for r in ranks) == 2 * 80 * 8 * 128 * 2 * 8192
    # the M2 Ultra (800 GB/s) reads the most layers; rank 0 also holds the head
    assert ranks[2]["layers"] == max(r["layers"] for r in ranks)
    assert ranks[0]["weight_bytes"] > doc["model"]["head_bytes"]
    assert doc["tokens_per_s_bound"] == pytest.approx(1000 / doc["est_ms_per_token"], rel=1e-3)
    assert doc["est_ms_per_token"] == pytest.approx(
        sum(r["est_ms_per_token"] for r in ranks), rel=1e-3)
    assert doc["hops"] == "assumed" and doc["split"] == [r["layers"] for r in ranks]
    assert doc["head_share_rows"] == ranks[2]["head_rows"] == 96256
    assert ranks[0]["head_rows"] == ranks[1]["head_rows"] == 0


def test_config_only_plans_like_the_weights(model_dir, tmp_path):
    path = model_dir("tiny-llama")
    (tmp_path / "config.json").write_text(
        json.dumps(dict(json.loads((path / "config.json").read_text()), torch_dtype="float32")))
    hostfile = tmp_path / "hosts"
    hostfile.write_text("a slots=1 # pipeline: mem=1G\nb slots=2 # pipeline: mem=2G bw=10G\n")
    with_weights = plan_json(0, "--model", str(path), "--hostfile", str(hostfile))
    config_only = plan_json(0, "--model", str(tmp_path), "--hostfile", str(hostfile))
    assert "safetensors" in with_weights["model"]["description"]
    assert "config.json" in config_only["model"]["description"]
    assert with_weights["ranks"] == config_only["ranks"]
    assert [r["memory_bytes"] for r in config_only["ranks"]] == [GiB, GiB, GiB]
    assert config_only["est_ms_per_token"] is None  # host a declares no bandwidth
    check_ranges(config_only, 7)


def test_does_not_fit(config_only_70b, tmp_path):
    hostfile = tmp_path / "small"
    hostfile.write_text("m1 slots=1 # pipeline: mem=24G bw=100G\nm2 slots=1 # pipeline: mem=16G\n")
    proc = run_pipeline(0, "plan", "--model", str(config_only_70b), "--hostfile", str(hostfile),
                        "--max-context", "8192", timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("pipeline: error:")]
    assert len(errors) == 1 and "does not fit at --max-context 8192" in errors[0]
    assert "rank 0 (m1) needs" in proc.stderr and "short by" in proc.stderr
    assert "what would fit: one more node with at least" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_hostfile_names_the_line(config_only_70b, tmp_path):
    hostfile = tmp_path / "bad"
    hostfile.write_text("ok slots=1 # pipeline: mem=8G\nbroken slots=x\n")
    proc = run_pipeline(0, "plan", "--model", str(config_only_70b), "--hostfile", str(hostfile),
                        timeout=120)
    assert proc.returncode == 2
    assert f"pipeline: error: {hostfile}:2: 'slots=x'" in proc.stderr


def test_measured_under_mpirun(model_dir):
    # --tp 1: the pure pipeline (whether a group of 2 pays for this tiny model depends on the
    # box's measured latency; tests/test_planner_tp.py checks that choice with declared links)
    doc = plan_json(2, "--model", str(model_dir("tiny-llama")), "--tp", "1")
    check_ranges(doc, 7)
    assert doc["source"].startswith("measured on 2 rank(s) under mpirun") and doc["hops"] == "measured"
    assert doc["max_context"] == 2048  # the model's context
    host = socket.gethostname()
    caps = doc["capacities"]
    assert [c["host"] for c in caps] == [host, host] and all(c["local_ranks"] == 2 for c in caps)
    assert all(c["bandwidth"] > 1e8 and c["total_memory"] > GiB and c["disk_free"] > 0
               for c in caps)
    ranks = doc["ranks"]
    # one host, rank 0's: each rank plans with its half of the memory available at start
    assert all(r["memory_bytes"] == min(c["total_memory"], c["available_memory"]) // 2
               for r, c in zip(ranks, caps))
    assert all(r["est_ms_per_token"] > 0 for r in ranks) and doc["tokens_per_s_bound"] > 0
    assert sorted(doc["split"]) == [3, 4]  # one host, one bandwidth: the even split


def test_hostfile_caps_force_an_uneven_split_under_mpirun(model_dir, tmp_path):
    # tiny-llama float32: head 128 KiB, each layer 145 KiB + 512 KiB of KV cache at 2048
    # tokens, headroom 256 MiB: rank 0's cap leaves room for its head and 2 layers at most.
    # One line per rank, without slots=: the same file goes to mpirun -hostfile.
    hostfile = tmp_path / "caps"
    hostfile.write_text("localhost  # pipeline: mem=257.5M\n"
                        "localhost  # pipeline: mem=300M\n")
    py = [sys.executable, "-m", "pipeline", "plan", "--model", str(model_dir("tiny-llama")),
          "--hostfile", str(hostfile), "--memory-fraction", "1", "--json"]
    proc = subprocess.run([MPIRUN, "-hostfile", str(hostfile), "-np", "2", "--bind-to", "none",
                           *py], capture_output=True, text=True, timeout=120, env=mpi_env(),
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    check_ranges(doc, 7)
    assert doc["ranks"][0]["memory_bytes"] == int(257.5 * 2**20)
    assert doc["ranks"][1]["memory_bytes"] == 300 * 2**20
    assert doc["split"][0] <= 2 and "memory capped by" in doc["source"]


def test_does_not_fit_under_mpirun_ends_every_rank(model_dir, tmp_path):
    hostfile = tmp_path / "tiny"
    hostfile.write_text("localhost slots=2 # pipeline: mem=200M\n")
    proc = run_pipeline(2, "plan", "--model", str(model_dir("tiny-llama")), "--hostfile",
                        str(hostfile), timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("pipeline: error:")]
    assert len(errors) == 1 and "does not fit" in errors[0]
    assert "rank 0 (" in proc.stderr and "rank 1 (" in proc.stderr and "short by" in proc.stderr


def test_a_run_that_dequantizes_plans_with_dense_sizes(config_only_70b):
    """The embedded model is expanded to float32 at load on a CPU: the plan must weigh (and
    balance) the dense layers, not the 4-bit ones in the checkpoint."""
    from pipeline.place.cluster import Capacity
    from pipeline.place.preflight import preflight_plan

    config = json.loads((config_only_70b / "config.json").read_text())
    caps = [Capacity(r, f"h{r}", 1024 * GiB, None, "cpu", "x", None, 100e9, None, "/")
            for r in range(2)]
    packed = preflight_plan(config_only_70b, config, caps, max_context=1024)
    dense = preflight_plan(config_only_70b, config, caps, max_context=1024, dequantize=True,
                           dtype="float32")  # what a CPU run holds
    assert sum(r.weight_bytes for r in dense.ranks) > 6 * sum(r.weight_bytes for r in packed.ranks)
    assert dense.ranks[0].weight_bytes / dense.ranks[0].layers > 6 * (
        packed.ranks[0].weight_bytes / packed.ranks[0].layers)


def test_prompt_cache_is_counted_next_to_weights_and_kv(model_dir, tmp_path):
    # 512M at fraction 0.8 leaves ~150 MiB beside the headroom: the throughput plan's default
    # 2G prompt cache is cut to what fits, with a note; the chat plan (REPL) counts none
    hostfile = tmp_path / "hosts"
    hostfile.write_text("a slots=1 # pipeline: mem=512M bw=100G\nb slots=1 # pipeline: mem=1G\n")
    model = str(model_dir("tiny-llama"))
    proc = run_pipeline(0, "plan", "--model", model, "--hostfile", str(hostfile), timeout=120)
    assert proc.returncode == 0, proc.stderr
    chat, throughput = proc.stdout.split("throughput plan (")
    assert "prompt cache: none (the REPL and one-shot runs keep none)" in chat
    assert "KV cache  prompt cache" in chat and "KV cache  prompt cache" in throughput
    note = next(line for line in throughput.splitlines() if line.startswith("note:"))
    assert "--prompt-cache-bytes 2 GiB per rank does not fit beside the model" in note
    kept = int(note.split("gets ")[1].split("M per rank")[0])
    assert 100 < kept < 160 and f"prompt cache: {kept} MiB per rank" in throughput
    doc = plan_json(0, "--model", model, "--hostfile", str(hostfile),
                    "--prompt-cache-bytes", "64M")
    for plan in doc["plans"].values():  # asked for: counted in both plans, as asked
        assert plan["prompt_cache_bytes"] == plan["prompt_cache_asked_bytes"] == 64 * 2**20
        assert plan["prompt_cache_note"] is None
        for r in plan["ranks"]:
            assert r["prompt_cache_bytes"] == 64 * 2**20
            assert r["need_bytes"] == (r["weight_bytes"] + r["kv_bytes"] + r["headroom_bytes"]
                                       + r["prompt_cache_bytes"]) <= r["usable_bytes"]
    proc = run_pipeline(0, "plan", "--model", model, "--hostfile", str(hostfile),
                        "--prompt-cache-bytes", "lots", timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == ("pipeline: error: --prompt-cache-bytes: 'lots' is not a size "
                                   "such as 64G, 512M or 1.5T")


@pytest.mark.slow  # a 2-rank server (start_server, imported: not seen by conftest)
def test_serve_starts_with_the_prompt_cache_that_fits(model_dir, tmp_path):
    """The run's own plan counts --prompt-cache-bytes too: capped at 300M a rank, the default
    2G is cut to what fits beside the layers, said once, and that is the engine's budget."""
    from test_serve import start_server, stop_server

    hostfile = tmp_path / "caps"
    hostfile.write_text("localhost  # pipeline: mem=300M\nlocalhost  # pipeline: mem=300M\n")
    served = start_server(model_dir("tiny-llama"), "--hostfile", str(hostfile),
                          "--memory-fraction", "1")
    try:
        budget = served.stats()["prompt_cache"]["budget_bytes"]
    finally:
        stop_server(served)
    notes = [line for line in "".join(served.err).splitlines() if "pipeline: note:" in line]
    assert len(notes) == 1 and "--prompt-cache-bytes 2 GiB per rank does not fit" in notes[0]
    assert "--memory-fraction 1:" in notes[0] and "larger --memory-fraction" not in notes[0]
    kept = int(notes[0].split("gets ")[1].split("M per rank")[0])
    assert budget == kept * 2**20 and 0 < budget < 44 * 2**20  # 300M less the 256M headroom
