"""The placement planner, model sizing and hostfiles: pure functions, checked without MPI."""

import random

import pytest

from pipeline.place.cluster import Capacity, parse_vm_stat, ring_hops
from pipeline.place.hostfile import (HostfileError, parse_bandwidth, parse_hostfile_text,
                                     parse_size, rank_entries, read_hostfile)
from pipeline.place.cost import config_cost, default_max_context, model_cost, quantized_alternatives
from pipeline.model.load import read_config
from pipeline.place.planner import (HEADROOM_BYTES, GiB, ModelCost, Node, PlanError,
                                    check_split, describe_split, plan_layers)
from pipeline.place.split import SplitError
from pipeline.place.preflight import (cache_note, nodes_from_capacities, nodes_from_hostfile,
                                      plan_job, planning_memory)

from conftest import ARCHS, ROOT
from helpers import brute_force_plan

GB = 10**9
LLAMA_70B = dict(model_type="llama", hidden_size=8192, num_hidden_layers=80,
                 intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                 rms_norm_eps=1e-5, vocab_size=128256, rope_theta=5e5,
                 max_position_embeddings=131072, torch_dtype="bfloat16")
Q4 = {"group_size": 64, "bits": 4}
APPLE_BW = {64: 273 * GB, 128: 546 * GB, 192: 800 * GB}  # M4 Pro, M4 Max, M2 Ultra


def q4_linear(out_features, in_features):
    # packed 4-bit weights + one float16 scale and bias per group of 64
    return out_features * in_features // 2 + 2 * (out_features * in_features // 64) * 2


@pytest.fixture(scope="module")
def cost_70b():
    """Llama-3.x-70B 4-bit (mlx-community layout), sized from its config alone."""
    return {tied: config_cost(dict(LLAMA_70B, tie_word_embeddings=tied, quantization=Q4))
            for tied in (True, False)}


def nodes_of(gbs, bandwidth=True):
    return [Node(r, f"mac{r}", gb * GiB, APPLE_BW.get(gb) if bandwidth else None)
            for r, gb in enumerate(gbs)]


def assert_valid(plan, cost, nodes):
    assert sum(plan.split) == cost.num_layers and min(plan.split) >= 1
    assert [r.layer_range for r in plan.ranks][0][0] == 0
    for a, b in zip(plan.ranks, plan.ranks[1:]):
        assert a.layer_range[1] == b.layer_range[0]  # contiguous
    for r, node in zip(plan.ranks, nodes):
        start, end = r.layer_range
        assert r.need_bytes <= r.usable_bytes == int(node.memory_bytes * 0.8)
        head = cost.head_bytes if r.rank == 0 else 0
        if r.head_rows:  # the last rank's share of the head's rows
            assert r.rank == len(nodes) - 1 > 0
            head = cost.head_matrix_bytes * r.head_rows // cost.vocab
        assert r.weight_bytes == sum(cost.layer_bytes[start:end]) + head


def test_shared_head_balances_layers_and_falls_back_when_it_does_not_fit():
    # bench-qwen2-200m-like: 16 layers of 44 MB, a 131 MB tied embedding (= the head's matrix)
    layer, matrix = 44 * 10**6, 131 * 10**6
    cost = ModelCost((layer,) * 16, matrix + 4096, (0,) * 16, head_matrix_bytes=matrix,
                     vocab=32000)
    nodes = [Node(r, f"n{r}", 4 * GiB, 10 * GB) for r in range(2)]
    plain = plan_layers(cost, nodes, 1, share_head=False)
    shared = plan_layers(cost, nodes, 1)
    assert plain.split == [7, 9] and plain.head_share_rows == 0  # the head weighs ~3 layers
    assert shared.split == [8, 8]  # half the head's matrix counted on each end of the ring
    assert shared.head_share_rows == 24064  # 3/4 of the rows, in multiples of 128
    assert shared.ranks[1].weight_bytes == 8 * layer + matrix * 24064 // 32000
    assert shared.ranks[0].weight_bytes == 8 * layer + cost.head_bytes
    # the same per-token estimate: one sequence's head is still rank 0's
    assert shared.est_ms_per_token == pytest.approx(plain.est_ms_per_token)
    # a last rank without room for the rows (and a rank 0 without room for more layers):
    # planned without sharing
    cap0 = 8 * layer + cost.head_bytes + HEADROOM_BYTES
    cap1 = 8 * layer + HEADROOM_BYTES + matrix // 2
    small = [Node(0, "n0", int(cap0 / 0.8) + 1, 10 * GB), Node(1, "n1", int(cap1 / 0.8), 10 * GB)]
    tight = plan_layers(cost, small, 1)
    assert tight.split == [7, 9] and tight.head_share_rows == 0
    assert check_split(cost, small, [8, 8], 1).head_share_rows == 0
    assert check_split(cost, nodes, [8, 8], 1).head_share_rows == 24064
    # one rank: nothing to share
    assert plan_layers(cost, nodes[:1], 1).head_share_rows == 0


def test_70b_sizes_from_config_match_the_shapes(cost_70b):
    h, i, kv = 8192, 28672, 8 * 128
    layer = (2 * q4_linear(h, h) + 2 * q4_linear(kv, h) + 2 * q4_linear(i, h)
             + q4_linear(h, i) + 2 * h * 2)
    embedding = q4_linear(128256, h)
    tied, untied = cost_70b[True], cost_70b[False]
    assert tied.layer_bytes == (layer,) * 80
    assert 0.43 * GB < layer < 0.49 * GB
    assert tied.head_bytes == embedding + h * 2  # embedding (= head) + final norm
    assert untied.head_bytes == 2 * embedding + h * 2
    assert tied.kv_token_bytes == (2 * kv * 2,) * 80  # keys + values, bfloat16
    assert tied.kv_bytes(8192) == [2 * kv * 2 * 8192] * 80


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("gbs", [(64, 128, 192), (192, 128, 64), (128, 64, 192),
                                 (64, 64, 128, 192), (128, 192)])
def test_plan_fits_and_beats_an_equal_split(cost_70b, tied, gbs):
    cost, nodes = cost_70b[tied], nodes_of(gbs)
    plan = plan_layers(cost, nodes, 8192)
    assert_valid(plan, cost, nodes)
    n = len(gbs)
    equal = [80 // n + (r < 80 % n) for r in range(n)]
    baseline = describe_split(cost, nodes, equal, 8192)
    assert plan.est_ms_per_token < baseline.est_ms_per_token
    # the fastest host holds the most layers
    fastest = max(range(n), key=lambda r: nodes[r].bandwidth)
    assert plan.split[fastest] == max(plan.split)
    assert plan.tokens_per_s == pytest.approx(1000 / plan.est_ms_per_token)


@pytest.mark.parametrize("tied", [True, False])
def test_head_counts_on_rank_zero_once(cost_70b, tied):
    cost, nodes = cost_70b[tied], nodes_of((64, 128, 192), bandwidth=False)
    plan = plan_layers(cost, nodes, 8192, share_head=False)
    assert_valid(plan, cost, nodes)
    layers_0 = sum(cost.layer_bytes[slice(*plan.ranks[0].layer_range)])
    assert plan.ranks[0].weight_bytes == layers_0 + cost.head_bytes
    assert all(r.weight_bytes == sum(cost.layer_bytes[slice(*r.layer_range)])
               for r in plan.ranks[1:])
    assert sum(r.weight_bytes for r in plan.ranks) == cost.weight_bytes


def test_untied_head_moves_layers_off_rank_zero():
    # Llama-3.2-1B: the 128256 x 2048 embedding weighs about 4 of its 16 layers
    from pipeline.model.make_model import preset_config

    config = preset_config("llama-3.2-1b")
    tied = config_cost(config)
    untied = config_cost(dict(config, tie_word_embeddings=False))
    assert untied.head_bytes - tied.head_bytes == 128256 * 2048 * 2  # float16 lm_head
    nodes = nodes_of((64, 64), bandwidth=False)
    tied_split = plan_layers(tied, nodes, 8192, share_head=False).split
    untied_split = plan_layers(untied, nodes, 8192, share_head=False).split
    assert untied_split[0] < tied_split[0] < tied_split[1]


def test_unknown_bandwidth_splits_in_proportion_to_memory(cost_70b):
    nodes = nodes_of((64, 128, 192), bandwidth=False)
    plan = plan_layers(cost_70b[True], nodes, 8192)
    assert plan.est_ms_per_token is None and plan.tokens_per_s is None
    uses = [r.need_bytes / r.usable_bytes for r in plan.ranks]
    assert max(uses) - min(uses) < 0.02  # every rank equally full
    assert plan.split[0] < plan.split[1] < plan.split[2]


def test_equal_bandwidth_gives_the_balanced_split():
    cost = ModelCost((10,) * 30, 100, (0,) * 30)
    nodes = [Node(r, "h", 10**6, 5e9) for r in range(2)]
    assert plan_layers(cost, nodes, 1, headroom_bytes=0).split == [10, 20]


def test_memory_caps_force_an_uneven_split():
    cost = ModelCost((100,) * 8, 50, (1,) * 8)  # rank 0 holds 50 bytes of head too
    even = [Node(0, "a", 1000, 1e9), Node(1, "b", 1000, 1e9)]
    capped = [Node(0, "a", 400, 1e9), Node(1, "b", 1000, 1e9)]
    assert plan_layers(cost, even, 10, memory_fraction=1.0, headroom_bytes=0).split == [4, 4]
    plan = plan_layers(cost, capped, 10, memory_fraction=1.0, headroom_bytes=0)
    # [4, 4] would need 490 of rank 0's 400: the most balanced stages that fit are [3, 5]
    assert plan.split == [3, 5]
    assert plan.ranks[0].need_bytes == 50 + 3 * 110
    # bandwidth unknown: memory-proportional (270/400 and 660/1000 full)
    blind = [Node(0, "a", 400), Node(1, "b", 1000)]
    assert plan_layers(cost, blind, 10, memory_fraction=1.0, headroom_bytes=0).split == [2, 6]


@pytest.mark.parametrize("bandwidths", [(1e10, 1e10), (3e10, 1e10), (1e10, 3e10)])
@pytest.mark.parametrize("share_head", [True, False])
def test_netns_memory_caps_bind_whatever_the_probe_measures(model_dir, bandwidths, share_head):
    """The caps of tests/test_netns.py's memory-cap test give the capped rank fewer layers of
    tiny-llama for any measured bandwidths (that test flaked when it relied on equal ones)."""
    path = model_dir("tiny-llama")
    cost = model_cost(path, read_config(path), "float32")
    capped, full = parse_size("320.5M"), parse_size("2G")
    for caps, smaller in (((capped, full), 0), ((full, capped), 1)):
        nodes = [Node(r, f"pn{r + 1}", caps[r], bandwidths[r]) for r in range(2)]
        split = plan_layers(cost, nodes, 64, share_head=share_head).split
        assert sum(split) == 7 and split[smaller] < split[1 - smaller], (caps, bandwidths, split)


@pytest.mark.parametrize("seed", range(12))
def test_plan_is_optimal_by_brute_force(seed):
    rng = random.Random(seed)
    n_layers, size = 9, 3
    cost = ModelCost(tuple(rng.randint(50, 150) for _ in range(n_layers)), rng.randint(0, 200),
                     tuple(rng.randint(0, 5) for _ in range(n_layers)))
    nodes = [Node(r, f"h{r}", rng.randint(300, 900), rng.choice([1e9, 2e9, 4e9]))
             for r in range(size)]
    brute_force_plan(cost, nodes, n_layers)


def test_sliding_window_layers_cap_their_kv_cache():
    cost = ModelCost((10,) * 4, 0, (8,) * 4, kv_window=(16, None, 16, None))
    assert cost.kv_bytes(1000) == [128, 8000, 128, 8000]
    assert cost.kv_bytes(10) == [80, 80, 80, 80]


def test_infeasible_names_the_short_rank_and_what_would_fit():
    config = dict(LLAMA_70B, tie_word_embeddings=False)  # bfloat16: ~141 GB of weights
    cost = config_cost(config)
    nodes = nodes_of((64, 64))
    with pytest.raises(PlanError) as e:
        plan_layers(cost, nodes, 8192, alternatives=quantized_alternatives(config))
    msg = str(e.value)
    assert "does not fit at --max-context 8192 and --memory-fraction 0.8" in msg
    assert "rank 0 (mac0) needs" in msg and "rank 1 (mac1) needs" in msg and "short by" in msg
    assert "51.2 GiB usable of 64 GiB" in msg
    assert "an 8-bit quantized variant (69.8 GiB of weights)" in msg
    assert "a 4-bit quantized variant (37 GiB of weights)" in msg
    assert "one more node with at least" in msg
    assert "--max-context" not in msg.split("what would fit:")[1]  # weights alone do not fit
    # the suggested node really is enough, and 1 GiB less is not
    gib = int(msg.split("one more node with at least ")[1].split(" GiB")[0])
    plan_layers(cost, [*nodes, Node(2, "new", gib * GiB)], 8192)
    with pytest.raises(PlanError):
        plan_layers(cost, [*nodes, Node(2, "new", (gib - 1) * GiB)], 8192)


def test_infeasible_context_suggests_a_shorter_one(cost_70b):
    cost, nodes = cost_70b[True], nodes_of((48, 48), bandwidth=False)
    with pytest.raises(PlanError) as e:
        plan_layers(cost, nodes, 131072, alternatives=quantized_alternatives(
            dict(LLAMA_70B, quantization=Q4)))
    msg = str(e.value)
    assert "quantized variant" not in msg  # already 4-bit
    context = int(msg.split("--max-context ")[-1].split(";")[0].split()[0])
    assert context % 256 == 0 and 8192 < context < 131072
    plan_layers(cost, nodes, context)
    with pytest.raises(PlanError):
        plan_layers(cost, nodes, context + 512)


def test_rank_zero_too_small_for_the_head():
    cost = ModelCost((10,) * 4, 1000, (0,) * 4)
    nodes = [Node(0, "tiny", 500), Node(1, "big", 10**6)]
    with pytest.raises(PlanError) as e:
        plan_layers(cost, nodes, 1, memory_fraction=1.0, headroom_bytes=0)
    msg = str(e.value)
    assert "rank 0 (tiny) needs 1010 B" in msg and "short by 510 B" in msg
    assert "rank 1" not in msg.split("what would fit")[0].split("leaves")[1]
    assert "neither fewer context tokens, a quantized variant nor one more node" in msg


def test_check_split_names_the_rank_that_does_not_fit():
    cost = ModelCost((100,) * 6, 0, (0,) * 6)
    nodes = [Node(0, "a", 250), Node(1, "b", 1000)]
    assert check_split(cost, nodes, [2, 4], 1, memory_fraction=1.0, headroom_bytes=0).split == [2, 4]
    with pytest.raises(PlanError, match=r"(?s)--split 3,3 does not fit.*rank 0 \(a\) needs 300 B"):
        check_split(cost, nodes, [3, 3], 1, memory_fraction=1.0, headroom_bytes=0)


MiB = 2**20
NINE_GIB = ModelCost((GiB,) * 8, GiB, (0,) * 8)  # 8 layers of 1 GiB, a 1 GiB head; no KV cache


def test_prompt_cache_counts_on_every_rank():
    nodes = [Node(0, "a", 8 * GiB, 1e11), Node(1, "b", 8 * GiB, 1e11)]
    plan = plan_job(NINE_GIB, nodes, 1, cache_bytes=512 * MiB)
    assert plan.cache_bytes == plan.cache_asked == 512 * MiB and cache_note(plan) is None
    for r in plan.ranks:
        assert r.cache_bytes == 512 * MiB
        assert r.need_bytes == r.weight_bytes + r.kv_bytes + HEADROOM_BYTES + 512 * MiB
        assert r.need_bytes <= r.usable_bytes
    assert plan.to_json()["prompt_cache_bytes"] == plan.ranks[1].to_json()["prompt_cache_bytes"]
    assert plan_job(NINE_GIB, nodes, 1).cache_bytes == 0  # none asked: none counted


def test_a_prompt_cache_that_does_not_fit_is_cut_to_what_does():
    # 6.4 GiB usable per rank holds 5 GiB of layers (4 + the head, or 5) and the headroom:
    # what is left of it, in whole MiB, is the most cache either split leaves room for
    nodes = [Node(0, "a", 8 * GiB, 1e11), Node(1, "b", 8 * GiB, 1e11)]
    most = (int(8 * GiB * 0.8) - 5 * GiB - HEADROOM_BYTES) // MiB * MiB
    plan = plan_job(NINE_GIB, nodes, 1, tp=1, cache_bytes=2 * GiB)
    assert plan.cache_asked == 2 * GiB and plan.cache_bytes == most
    assert all(r.cache_bytes == most and r.need_bytes <= r.usable_bytes for r in plan.ranks)
    assert plan_job(NINE_GIB, nodes, 1, tp=1, cache_bytes=most).cache_bytes == most  # as is
    assert plan_job(NINE_GIB, nodes, 1, tp=1, cache_bytes=most + MiB).cache_bytes == most
    note = cache_note(plan)
    assert note.startswith("--prompt-cache-bytes 2 GiB per rank does not fit beside the model")
    assert f"gets {most // MiB}M per rank" in note and f"--prompt-cache-bytes {most // MiB}M" in note
    # the cache moves layers, never the layout: over slow links the pipeline stays, with the
    # cut cache, though a tensor-parallel group would leave room for more
    slow = [Node(r, h, 8 * GiB, 1e11, latency_s=0.01) for r, h in enumerate("ab")]
    assert plan_job(NINE_GIB, slow, 1).groups == [1, 1]
    kept = plan_job(NINE_GIB, slow, 1, cache_bytes=2 * GiB)
    assert kept.groups == [1, 1] and kept.cache_bytes == most
    # a tensor-parallel group: each member keeps its own cache beside half of every layer
    tp = plan_job(NINE_GIB, nodes, 1, tp=2, cache_bytes=2 * GiB)
    half = (int(8 * GiB * 0.8) - -(-9 * GiB // 2) - HEADROOM_BYTES) // MiB * MiB
    assert tp.groups == [2] and [r.cache_bytes for r in tp.ranks] == [half, half]


def test_no_room_for_a_prompt_cache_turns_it_off_and_a_model_too_big_still_fails():
    nodes = [Node(0, "a", 8 * GiB, 1e11), Node(1, "b", 8 * GiB, 1e11)]
    full = plan_job(NINE_GIB, nodes, 1, memory_fraction=(5 * GiB + HEADROOM_BYTES) / (8 * GiB),
                    tp=1, cache_bytes=GiB)
    assert full.cache_bytes == 0 and "the prompt cache is off" in cache_note(full)
    with pytest.raises(PlanError, match="the model does not fit"):
        plan_job(NINE_GIB, nodes_of((4, 4)), 1, cache_bytes=GiB)


def test_bad_inputs():
    cost = ModelCost((1,) * 2, 0, (0,) * 2)
    with pytest.raises(SplitError, match="at most 2"):
        plan_layers(cost, [Node(r, "h", GiB) for r in range(3)], 1)
    with pytest.raises(PlanError, match="--memory-fraction 1.5"):
        plan_layers(cost, [Node(0, "h", GiB)], 1, memory_fraction=1.5)
    with pytest.raises(PlanError, match="--max-context 0"):
        plan_layers(cost, [Node(0, "h", GiB)], 0)


def test_hops_add_to_the_estimate():
    cost = ModelCost((10**9,) * 4, 0, (0,) * 4)
    nodes = [Node(r, "h", 100 * GiB, 1e12) for r in range(2)]
    plan = plan_layers(cost, nodes, 1, hops=[1e-3, 2e-3])
    assert plan.hop_ms == pytest.approx(3.0)
    assert plan.est_ms_per_token == pytest.approx(4.0 + 3.0)


@pytest.mark.parametrize("like", ARCHS)
@pytest.mark.parametrize("bits", [None, 4])
def test_config_alone_sizes_like_the_weights(model_dir, tmp_path, like, bits):
    path = model_dir(like, quantize_bits=bits) if bits else model_dir(like)
    config = read_config(path)
    from_weights = model_cost(path, config)
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    from_config = model_cost(tmp_path, config, dtype="float32")  # tiny models are float32
    assert "safetensors" in from_weights.description and "config" in from_config.description
    assert from_config.layer_bytes == from_weights.layer_bytes
    assert from_config.head_bytes == from_weights.head_bytes
    assert from_config.kv_token_bytes == from_weights.kv_token_bytes
    assert from_config.kv_window == from_weights.kv_window
    if like == "tiny-gemma3":  # layers 2 and 5 are global, the others slide over 8 tokens
        assert from_config.kv_window == (8, 8, None, 8, 8, None, 8)


def test_cast_dtype_doubles_float16_weights(model_dir):
    path = model_dir("tiny-llama", dtype="float16")
    config = read_config(path)
    stored, cast = model_cost(path, config), model_cost(path, config, dtype="float32")
    assert stored.dtype == "float16" and cast.dtype == "float32"
    assert [2 * b for b in stored.layer_bytes] == list(cast.layer_bytes)
    assert 2 * stored.kv_token_bytes[0] == cast.kv_token_bytes[0]


def test_default_max_context():
    assert default_max_context({"max_position_embeddings": 4096}) == 4096
    assert default_max_context({}) == 8192


# --- hostfiles ---------------------------------------------------------------------------


def test_shipped_hostfiles_declare_memory_and_bandwidth():
    tb4 = read_hostfile(ROOT / "hostfiles" / "tb4")
    assert [e.host for e in tb4] == ["192.168.1.1", "192.168.1.20", "192.168.1.30"]
    assert [e.memory_bytes // GiB for e in tb4] == [64, 128, 192]
    assert [e.bandwidth for e in tb4] == [273e9, 546e9, 800e9]
    assert tb4[0].chip == "M4 Pro" and tb4[0].name == "Mac mini (hub)" and tb4[0].slots == 1
    ethernet = read_hostfile(ROOT / "hostfiles" / "ethernet")
    assert len(ethernet) == 5 and all(e.memory_bytes and e.bandwidth for e in ethernet)
    local = read_hostfile(ROOT / "hostfiles" / "local")
    assert local[0].host == "localhost" and local[0].slots == 4 and local[0].memory_bytes is None


def test_host_once_per_slot():
    entries = parse_hostfile_text("a # pipeline: mem=1G\na # pipeline: mem=2G\n")
    assert [(e.host, e.memory_bytes // GiB) for e in rank_entries(entries)] == [("a", 1), ("a", 2)]


def test_hostfile_syntax():
    entries = parse_hostfile_text(
        "# comment\n\n  a slots=2 max_slots=4  # plain comment\n"
        "b # pipeline: mem=1.5T bw=100GB/s name=\"x y\"\n"
        "c slots=1#pipeline:mem=512M\n")
    assert [(e.host, e.slots, e.line) for e in entries] == [("a", 2, 3), ("b", None, 4),
                                                            ("c", 1, 5)]
    assert entries[0].memory_bytes is None
    assert entries[1].memory_bytes == int(1.5 * 2**40) and entries[1].bandwidth == 100e9
    assert entries[1].label == "b (x y)" and entries[2].memory_bytes == 512 * 2**20
    assert [e.host for e in rank_entries(entries)] == ["a", "a", "b", "c"]


@pytest.mark.parametrize("text, needle", [
    ("a slots=0", "H:1: 'slots=0': slots must be a positive integer"),
    ("\na slot=2", "H:2: 'slot=2' is not slots=N"),
    ("a # pipeline: mem=lots", "H:1: 'lots' is not a size"),
    ("a # pipeline: ram=4G", "H:1: unknown key 'ram'"),
    ("a # pipeline: name=\"open", "H:1: cannot read"),
    ("a # pipeline: mem", "H:1: 'mem' is not key=value"),
    ("a # pipeline: bw=-3", "H:1:"),
    ("# nothing\n", "H: no hosts"),
    ("a slots=2\nb\na", "H:3: a is already on line 1"),
])
def test_hostfile_errors_name_file_and_line(text, needle):
    with pytest.raises(HostfileError) as e:
        parse_hostfile_text(text, "H")
    assert needle in str(e.value)


def test_missing_hostfile(tmp_path):
    with pytest.raises(HostfileError, match="cannot read hostfile"):
        read_hostfile(tmp_path / "nope")


def test_sizes_and_bandwidths():
    assert parse_size("64G") == parse_size("64GiB") == parse_size("64gb") == 64 * 2**30
    assert parse_size("1024") == 1024 and parse_size("2k") == 2048
    assert parse_bandwidth("273G") == parse_bandwidth("273GB/s") == parse_bandwidth("2.73e11")


def test_nodes_from_hostfile_share_a_line_between_its_slots():
    entries = parse_hostfile_text("a slots=2 # pipeline: mem=64G bw=1G\nb # pipeline: mem=8G")
    nodes = nodes_from_hostfile(entries)
    assert [(n.rank, n.host, n.memory_bytes // GiB, n.bandwidth) for n in nodes] == [
        (0, "a", 32, 1e9), (1, "a", 32, 1e9), (2, "b", 8, None)]
    with pytest.raises(HostfileError, match="H:1: a declares no memory"):
        nodes_from_hostfile(parse_hostfile_text("a slots=1", "H"), "H")


def capacity(rank, host, total, bw, local_ranks=1, available=None):
    return Capacity(rank, host, total, available, "cpu", "x", None, bw, None, "/", local_ranks)


@pytest.mark.parametrize("total, available, local_ranks, first, expected", [
    (64, 40, 1, True, 40),     # the Mac you type on: what is free now
    (64, 40, 1, False, 64),    # another host runs only its ranks: its total
    (64, 80, 1, True, 64),     # never more than the total
    (64, None, 1, True, 64),   # available unknown: the total
    (64, 40, 2, True, 20),     # two ranks on rank 0's host share what is free
    (64, 40, 2, False, 32),
])
def test_planning_memory(total, available, local_ranks, first, expected):
    cap = capacity(0, "h", total * GiB, None, local_ranks,
                   None if available is None else available * GiB)
    assert planning_memory(cap, first) == expected * GiB


def test_rank_zero_is_planned_with_its_available_memory():
    """A 64 GiB Mac with 24 GiB free next to two idle 64 GiB Macs: rank 0 gets fewer layers
    than on total memory, and the others are planned with their totals."""
    caps = [capacity(0, "laptop", 64 * GiB, 273e9, available=24 * GiB),
            capacity(1, "mini", 64 * GiB, 273e9, available=20 * GiB),
            capacity(2, "studio", 64 * GiB, 273e9, available=60 * GiB)]
    nodes = nodes_from_capacities(caps)
    assert [n.memory_bytes // GiB for n in nodes] == [24, 64, 64]
    cost = ModelCost((GiB,) * 90, 2 * GiB, (0,) * 90)
    split = plan_layers(cost, nodes, 16).split
    usable0 = int(24 * GiB * 0.8) - HEADROOM_BYTES - 2 * GiB
    assert split[0] <= usable0 // GiB < 30  # 30: a third, as on total memory
    assert sum(split) == 90


def test_nodes_from_capacities():
    caps = [capacity(0, "h", 16 * GiB, 1e9, 2), capacity(1, "h", 16 * GiB, 3e9, 2),
            capacity(2, "g", 8 * GiB, None)]
    nodes = nodes_from_capacities(caps)
    assert [n.memory_bytes // GiB for n in nodes] == [8, 8, 8]
    assert [n.bandwidth for n in nodes] == [2e9, 2e9, None]  # one host, one bandwidth
    capped = nodes_from_capacities(caps, parse_hostfile_text(
        "x # pipeline: mem=2G\ny # pipeline: mem=64G\nz"))
    assert [n.memory_bytes // GiB for n in capped] == [2, 8, 8]  # by slot order
    with pytest.raises(HostfileError, match="1 slots but the job has 3 ranks"):
        nodes_from_capacities(caps, parse_hostfile_text("x slots=1"))


def test_near_equal_bandwidths_count_as_one_speed():
    """Probe noise between alike hosts must not pile the layers onto one of them."""
    caps = [capacity(0, "a", 16 * GiB, 10.0e9), capacity(1, "b", 16 * GiB, 11.0e9),
            capacity(2, "c", 16 * GiB, 25e9), capacity(3, "d", 16 * GiB, 27e9)]
    nodes = nodes_from_capacities(caps)
    assert [n.bandwidth for n in nodes] == [10.5e9, 10.5e9, 26e9, 26e9]
    cost = ModelCost((10**6,) * 32, 3 * 10**6, (0,) * 32)
    split = plan_layers(cost, nodes[:2], 16, headroom_bytes=0).split
    assert split == [15, 17]  # balanced stages (rank 0 also holds the head), not [1, 31]


def test_vm_stat_parsing():
    text = ("Mach Virtual Memory Statistics: (page size of 16384 bytes)\n"
            "Pages free:                               10.\nPages active:   99.\n"
            "Pages inactive:                           20.\nPages speculative:  5.\n"
            "Pages wired down:                         7.\n")
    assert parse_vm_stat(text) == 35 * 16384
    assert parse_vm_stat("garbage") is None


def test_ring_hops():
    assert ring_hops(1) == [] and ring_hops(2) == [(0, 1)]
    assert ring_hops(3) == [(0, 1), (1, 2), (2, 0)]
