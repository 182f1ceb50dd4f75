"""Stages of tensor-parallel rank groups: link latency, the cost model, which group sizes a
model allows, the chat and throughput objectives, and what `plan` prints for the shipped
hostfiles. Pure Python: no MPI, no weights."""

import json
import math

import pytest

from pipeline.place.cost import config_cost
from pipeline.place.groups import (HIGH_CONCURRENCY, LOGIT_BYTES, SAME_HOST_LATENCY_S, TP_MARGIN,
                                   Link, allgather_s, allreduce_s, ring_links)
from pipeline.place.hostfile import HostfileError, parse_hostfile_text, parse_latency
from pipeline.place.planner import (DEFAULT_HOP_LATENCY_S, DEFAULT_LINK_BANDWIDTH, PlanError)
from pipeline.place.preflight import nodes_from_hostfile, plan_job

from conftest import run_pipeline
from test_plan_cmd import LLAMA_70B_4BIT
from test_planner_moe import QWEN3_235B

# A dense 24-layer model of ~1.5B parameters, float16 (3 GB read per token).
DENSE_24 = dict(model_type="llama", hidden_size=2048, num_hidden_layers=24,
                intermediate_size=8192, num_attention_heads=16, num_key_value_heads=8,
                rms_norm_eps=1e-5, vocab_size=32000, max_position_embeddings=4096,
                tie_word_embeddings=False, torch_dtype="float16")
# Qwen2-0.5B's shapes: 14 attention heads, 2 KV heads, MLP 4864.
QWEN2_05B = dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24,
                 intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2,
                 rms_norm_eps=1e-6, vocab_size=151936, max_position_embeddings=4096,
                 tie_word_embeddings=True, torch_dtype="bfloat16")


def hosts(n: int, lat: str, mem: str = "64G", bw: str = "400G") -> list:
    text = "".join(f"h{i} slots=1 # pipeline: mem={mem} bw={bw} lat={lat}\n" for i in range(n))
    return nodes_from_hostfile(parse_hostfile_text(text))


@pytest.fixture(scope="module")
def dense():
    return config_cost(DENSE_24)


# --- lat= --------------------------------------------------------------------------------


@pytest.mark.parametrize("text, seconds", [("8us", 8e-6), ("8 us", 8e-6), ("0.3ms", 3e-4),
                                           ("1e-4s", 1e-4), ("2S", 2.0), ("5µs", 5e-6)])
def test_latency_units(text, seconds):
    assert parse_latency(text) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["8", "fast", "0us", "-1ms", "8ns", "1..2ms"])
def test_bad_latency_names_file_and_line(value):
    with pytest.raises(HostfileError, match=r"^hosts:2: .*latency"):
        parse_hostfile_text(f"a slots=1\nb slots=1 # pipeline: mem=1G lat={value}\n", "hosts")


def test_links_from_declared_latencies():
    text = ("a slots=2 # pipeline: mem=8G lat=40us\nb slots=1 # pipeline: mem=8G lat=0.2ms\n"
            "c slots=1 # pipeline: mem=8G\n")
    links = ring_links(nodes_from_hostfile(parse_hostfile_text(text)), 4096)
    # a-a: one host (shared memory); a-b, b-c: the slower end; c-a: a's (c declares none)
    assert [k.latency_s for k in links] == pytest.approx([SAME_HOST_LATENCY_S, 2e-4, 2e-4, 4e-5])
    none = nodes_from_hostfile(parse_hostfile_text("a # pipeline: mem=8G\nb # pipeline: mem=8G\n"))
    assert [k.latency_s for k in ring_links(none, 4096)] == [DEFAULT_HOP_LATENCY_S] * 2
    # measured: the hop of one hidden state is exactly what was measured
    measured = ring_links(none, 4096, [3e-5, 5e-5])
    assert [k.seconds(4096) for k in measured] == [3e-5, 5e-5]


def test_allreduce_formula():
    link = Link(8e-6, 1e9)
    assert allreduce_s(link, 1, 4096) == 0
    assert allreduce_s(link, 2, 4096) == pytest.approx(2 * (8e-6 + 2048 / 1e9))
    assert allreduce_s(link, 4, 4096) == pytest.approx(6 * (8e-6 + 1024 / 1e9))
    assert allgather_s(link, 4, 4096) == pytest.approx(3 * (8e-6 + 1024 / 1e9))


# --- the chat choice follows the link ----------------------------------------------------


def test_fast_link_picks_tp2_with_the_formula_in_the_reason(dense):
    nodes = hosts(2, "8us")
    plan = plan_job(dense, nodes, 4096, config=DENSE_24)
    assert plan.groups == [2] and plan.split == [24] and plan.head_share_rows == 0
    (stage,) = plan.stages
    m = DENSE_24["hidden_size"] * 2
    ar = 2 * (8e-6 + m / 2 / DEFAULT_LINK_BANDWIDTH)  # ring all-reduce, n = 2
    head = ar + (8e-6 + DENSE_24["vocab_size"] * LOGIT_BYTES / 2 / DEFAULT_LINK_BANDWIDTH)
    reads = sum(dense.read_bytes) + dense.head_bytes
    assert stage.allreduce_ms == pytest.approx((2 * 24 * ar + head) * 1e3)
    assert stage.compute_ms == pytest.approx(reads / (2 * 400e9) * 1e3)
    assert stage.hop_ms == 0 and plan.est_ms_per_token == pytest.approx(stage.ms)
    saved = reads / 400e9 / 2
    assert stage.reason.startswith(
        f"tp 2: link 8 us, 2 x 24 all-reduces of {ar * 1e6:.3g} us = {2 * 24 * ar * 1e3:.3g} ms "
        f"+ {head * 1e3:.3g} ms for the split head < {saved * 1e3:.3g} ms saved")
    # each rank holds half of everything: layers, head, KV cache
    kv = sum(dense.kv_bytes(4096))
    for r in plan.ranks:
        assert r.tp == 2 and r.layer_range == (0, 24)
        assert r.weight_bytes == math.ceil(dense.weight_bytes / 2)
        assert r.kv_bytes == math.ceil(kv / 2)
    pipeline_ms = dict((g, ms) for g, ms, _ in plan.layouts)[(1, 1)]
    assert plan.est_ms_per_token < pipeline_ms * (1 - TP_MARGIN)
    assert plan.to_json()["stages"][0] | {"reason": ""} == {
        "stage": 0, "ranks": [0, 1], "tp": 2, "layers": 24, "layer_range": [0, 24],
        "compute_ms": round(stage.compute_ms, 4), "allreduce_ms": round(stage.allreduce_ms, 4),
        "hop_ms": 0.0, "est_ms_per_token": round(stage.ms, 4),
        "step_ms": round(stage.step_ms, 4), "reason": ""}
    assert plan.to_json()["groups"] == [2]


def test_slow_link_keeps_the_pipeline_and_says_why(dense):
    plan = plan_job(dense, hosts(2, "1ms"), 4096, config=DENSE_24)
    assert plan.groups == [1, 1]
    assert plan.split == plan_job(dense, hosts(2, "1ms"), 4096, tp=1).split == [11, 13]
    ar = 2 * (1e-3 + DENSE_24["hidden_size"] * 2 / 2 / DEFAULT_LINK_BANDWIDTH)
    assert plan.stages[0].reason.startswith(
        f"tp 1: tp 2 with rank 1 (link 1 ms) would cost 2 x 11 all-reduces of {ar * 1e3:.3g} ms "
        f"= {22 * ar * 1e3:.3g} ms for ")
    assert plan.stages[0].allreduce_ms == 0 and all(r.tp == 1 for r in plan.ranks)
    # the hop between the stages: latency + hidden state / link bandwidth
    assert plan.stages[0].hop_ms == pytest.approx((1e-3 + 4096 / DEFAULT_LINK_BANDWIDTH) * 1e3)


def test_measured_hops_replace_declared_latency(dense):
    plan = plan_job(dense, hosts(2, "1ms"), 4096, hops=[10e-6, 10e-6], config=DENSE_24)
    assert plan.groups == [2]
    assert plan.stages[0].reason.startswith("tp 2: link 10 us, 2 x 24 all-reduces of 20 us")


def test_forced_tp_and_objective_errors(dense):
    assert plan_job(dense, hosts(2, "8us"), 4096, tp=1, config=DENSE_24).groups == [1, 1]
    assert plan_job(dense, hosts(2, "1ms"), 4096, tp=2, config=DENSE_24).groups == [2]
    slow = plan_job(dense, hosts(2, "1ms"), 4096, tp=2, config=DENSE_24).stages[0].reason
    assert " >= " in slow and slow.endswith("(--tp 2)")
    with pytest.raises(PlanError, match=r"^--tp 2 needs a multiple of 2 ranks but the job has 3: "
                                        r"run 4 ranks or use --tp 1 or 3$"):
        plan_job(dense, hosts(3, "8us"), 4096, tp=2)
    with pytest.raises(PlanError, match=r"^--tp 0 must be at least 1"):
        plan_job(dense, hosts(2, "8us"), 4096, tp=0)
    with pytest.raises(PlanError, match="--optimize fast is not one of chat, throughput"):
        plan_job(dense, hosts(2, "8us"), 4096, objective="fast")


def test_throughput_is_the_round_of_every_sequence(dense):
    """Many sequences: S sequences in one micro-batch per stage; a round (each one token
    further) is stages x the slowest step. Over a 1.25 GB/s link the all-reduces of 32
    hidden states cost more than tensor parallel saves: the pure pipeline."""
    plan = plan_job(dense, hosts(2, "8us"), 4096, objective="throughput", config=DENSE_24)
    assert plan.groups == [1, 1] and plan.objective == "throughput"
    steps = [s.step_ms for s in plan.stages]
    assert plan.step_ms == max(steps) and plan.round_ms == 2 * max(steps)
    assert plan.aggregate_tokens_per_s == pytest.approx(HIGH_CONCURRENCY * 1000 / (2 * max(steps)))
    assert "step of 16 sequences " in plan.stages[0].reason
    assert plan.to_json()["sequences"] == HIGH_CONCURRENCY


def _same_host(n: int, flops: str = "") -> list:
    text = "".join(f"h slots={n} # pipeline: mem=64G bw=400G {flops}\n")
    return nodes_from_hostfile(parse_hostfile_text(text))


def test_throughput_takes_tensor_parallel_while_steps_read_and_the_pipeline_once_they_compute(
        dense):
    """Ranks of one host (shared-memory all-reduces): while a step is the weights' read,
    one stage of two reads each half once per round where two stages read each half twice,
    so tensor parallel wins for throughput too; once the arithmetic dominates (a slow
    flops= rate), every stage is busy either way and the pipeline saves the all-reduces."""
    reading = plan_job(dense, _same_host(2), 4096, objective="throughput", config=DENSE_24)
    assert reading.groups == [2]
    rounds = {g: ms for g, _, ms in reading.layouts}
    assert rounds[(2,)] < rounds[(1, 1)] * (1 - TP_MARGIN)
    computing = plan_job(dense, _same_host(2, "flops=2T"), 4096, objective="throughput",
                         config=DENSE_24)
    assert computing.groups == [1, 1]
    step = computing.stages[0]
    reads = computing.leaders[0].read_bytes
    arithmetic = 16 * 2 * reads / dense.bytes_per_param / 2e12 * 1e3
    assert step.step_ms == pytest.approx(arithmetic, rel=0.05)  # (the head's share aside)
    assert step.step_ms > 2 * reads / 400e9 * 1e3  # longer than the read
    # the sequences decide too: 2 at once are one per micro-batch, a read again
    two = plan_job(dense, _same_host(2, "flops=2T"), 4096, objective="throughput",
                   config=DENSE_24, sequences=2)
    assert two.groups == [2]


@pytest.fixture
def config_folder(tmp_path):
    def make(config: dict) -> str:
        folder = tmp_path / config["model_type"]
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text(json.dumps(config))
        return str(folder)
    return make


def plan_doc(*args: str) -> dict:
    proc = run_pipeline(0, "plan", *args, "--json", timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_tb4_70b_chat_piles_and_throughput_balances(config_folder):
    model = config_folder(LLAMA_70B_4BIT)
    doc = plan_doc("--model", model, "--hostfile", "hostfiles/tb4", "--max-context", "8192")
    chat, batch = doc["plans"]["chat"], doc["plans"]["throughput"]
    assert doc["objective"] == "chat" and doc["split"] == chat["split"]
    assert chat["split"][:2] == [1, 1] and chat["split"][2] == 78  # one chat: the fastest Mac
    steps = [s["step_ms"] for s in batch["stages"]]
    assert max(steps) / min(steps) < 1.1  # balanced stage times
    assert batch["aggregate_tokens_per_s_bound"] > 1.5 * chat["aggregate_tokens_per_s_bound"]
    assert chat["tokens_per_s_bound"] > batch["tokens_per_s_bound"]
    proc = run_pipeline(0, "plan", "--model", model, "--hostfile", "hostfiles/tb4", timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "chat plan (" in out and "throughput plan (" in out
    assert out.count("tokens/s bound: ") == 2
    assert out.count(f"aggregate tokens/s bound at {HIGH_CONCURRENCY} concurrent: ") == 2
    assert "hops assumed (lat= declared)" in out
    forced = run_pipeline(0, "plan", "--model", model, "--hostfile", "hostfiles/tb4",
                          "--optimize", "throughput", timeout=120).stdout
    assert "throughput plan (" in forced and "chat plan (" not in forced


@pytest.mark.parametrize("hostfile, ranks", [("tb4", 3), ("ethernet", 5)])
@pytest.mark.parametrize("config", [LLAMA_70B_4BIT, QWEN3_235B], ids=["llama-70b", "qwen3-235b"])
def test_shipped_hostfiles_keep_the_pipeline_over_tcp(config_folder, hostfile, ranks, config):
    """TCP over Thunderbolt (lat=100us) and Ethernet (lat=150us): an all-reduce of a hidden
    state costs 2 x (latency + M/2 / 1.25 GB/s) >= 200 us, two per layer: more than splitting
    a stage's reading between two Macs saves, for every stage and both objectives."""
    doc = plan_doc("--model", config_folder(config), "--hostfile", f"hostfiles/{hostfile}")
    for objective, plan in doc["plans"].items():
        assert plan["groups"] == [1] * ranks, objective
        for stage in plan["stages"]:
            assert stage["tp"] == 1 and stage["allreduce_ms"] == 0
            assert stage["reason"].startswith("tp 1: tp 2 with rank ")
            # both 70B and Qwen3 have 64 heads: no group of 3 (nor 5)
            assert f"not tp 3: {config['model_type']} has 64 attention heads" in stage["reason"]
        tried = {tuple(t["groups"]): t for t in plan["layouts"]}
        assert (3,) not in tried and (1,) * ranks in tried
        assert (2, 1, 1, 1) in tried or ranks == 3  # every grouping of 1s, 2s and 4s
    proc = run_pipeline(0, "plan", "--model", config_folder(config), "--hostfile",
                        f"hostfiles/{hostfile}", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("    why: tp 1: tp 2 with rank ") == 2 * ranks
    assert "layouts tried (one-chat ms/token, slowest step): [1" in proc.stdout


def test_unknown_bandwidth_keeps_the_pipeline(dense):
    """No bandwidth, no time to compare: no all-reduce is worth adding (memory decides)."""
    nodes = hosts(2, "8us", bw="1")  # then drop the bandwidth
    nodes = [type(n)(n.rank, n.host, n.memory_bytes, None, latency_s=n.latency_s) for n in nodes]
    for objective in ("chat", "throughput"):
        plan = plan_job(dense, nodes, 4096, config=DENSE_24, objective=objective)
        assert plan.groups == [1, 1] and plan.est_ms_per_token is None
        assert plan.step_ms is None and plan.aggregate_tokens_per_s is None
        assert "(bandwidth unknown: pure pipeline)" in plan.stages[0].reason


def test_tb4_with_rdma_latency_groups_the_two_fast_macs_for_one_chat():
    """The same three Macs with lat=8us (RDMA-class links, DESIGN.md): for one chat the
    MacBook Pro and the Studio split their layers; many sequences still get the pipeline."""
    text = open("hostfiles/tb4").read().replace("lat=100us", "lat=8us")
    nodes = nodes_from_hostfile(parse_hostfile_text(text))
    config = dict(LLAMA_70B_4BIT)
    cost = config_cost(config)
    chat = plan_job(cost, nodes, 131072, config=config)
    assert chat.groups == [1, 2] and chat.split == [1, 79]
    assert chat.stages[1].reason.startswith("tp 2: link 8 us, 2 x 79 all-reduces of 29.1 us")
    assert chat.tokens_per_s > 1.15 * plan_job(cost, nodes, 131072, tp=1).tokens_per_s
    batch = plan_job(cost, nodes, 131072, config=config, objective="throughput")
    assert batch.groups == [1, 1, 1] and batch.split == [12, 28, 40]


def test_forced_tp_suggests_only_sizes_the_model_takes():
    cost = config_cost(QWEN2_05B)
    with pytest.raises(PlanError, match=r"^--tp 2 needs a multiple of 2 ranks but the job has 3: "
                                        r"run 4 ranks or use --tp 1$"):
        plan_job(cost, hosts(3, "8us"), 4096, tp=2, config=QWEN2_05B)
