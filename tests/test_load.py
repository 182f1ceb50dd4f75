"""Each rank materializes exactly its share of the tensors, and holds no more memory than it."""

import gc
import json

import mlx.core as mx
import pytest

from conftest import ARCHS
from pipeline.model.load import layer_of, load_stage, read_config, tensor_index
from pipeline.model.shell import UnsupportedModel
from pipeline.model.spec import ModelError
from pipeline.place.split import layer_ranges

SPLIT = [2, 3, 2]  # the tiny presets' 7 layers over 3 ranks


def held_by(load):
    """(result of load(), MLX memory it still holds, its peak above what was held before):
    measured by MLX's allocator, not summed from the tensors' sizes."""
    gc.collect()
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    result = load()
    gc.collect()
    return result, mx.get_active_memory() - before, max(mx.get_peak_memory() - before, 0)


def within_5_percent(measured: int, expected: int) -> bool:
    return abs(measured - expected) <= 0.05 * expected


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["float32", "3-shards", "bf16-4bit"])
def test_rank_loads_exactly_its_share(model_dir, arch, kind):
    made = {"float32": {}, "3-shards": dict(shards=3),
            "bf16-4bit": dict(dtype="bfloat16", quantize_bits=4)}[kind]
    path = model_dir(arch, **made)
    config = read_config(path)
    index = tensor_index(path)
    for rank, layer_range in enumerate(layer_ranges(SPLIT)):
        stage, held, peak = held_by(
            lambda: load_stage(path, config, layer_range, with_head=rank == 0))
        share = index.share(layer_range, with_head=rank == 0)
        assert stage.loaded_names == share
        layers = {layer_of(n) for n in stage.loaded_names}
        assert layers - {None} == set(range(*layer_range))
        assert (None in layers) == (rank == 0)  # embedding/norm/head only on rank 0
        share_bytes = sum(index.nbytes[n] for n in share)
        assert within_5_percent(held, share_bytes), (rank, held, share_bytes)
        assert peak <= 1.05 * share_bytes, (rank, peak, share_bytes)  # never the whole file
        del stage


def test_quantized_moe_rank_reads_only_its_experts(model_dir):
    """A 4-bit MoE checkpoint (experts stacked in switch layers): each of 2 ranks holds the
    quantized experts of its own layers and nothing else."""
    path = model_dir("tiny-qwen3-moe", quantize_bits=4)
    config, index = read_config(path), tensor_index(path)
    for rank, layer_range in enumerate(layer_ranges([4, 3])):
        stage = load_stage(path, config, layer_range, with_head=rank == 0)
        assert stage.loaded_names == index.share(layer_range, with_head=rank == 0)
        experts = [n for n in stage.loaded_names if ".switch_mlp." in n]
        assert {layer_of(n) for n in experts} == set(range(*layer_range))
        assert {n.rsplit(".", 1)[1] for n in experts} == {"weight", "scales", "biases"}


def test_cast_holds_the_cast_bytes(model_dir):
    path = model_dir("tiny-qwen2", dtype="bfloat16")
    config, index = read_config(path), tensor_index(path)
    stage, held, _ = held_by(lambda: load_stage(path, config, (2, 5), False, dtype="float32"))
    share_bytes = sum(index.nbytes[n] for n in index.share((2, 5), with_head=False))
    assert within_5_percent(held, 2 * share_bytes), (held, share_bytes)  # bf16 -> f32: twice


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-mistral"])  # tied head, separate head
def test_last_rank_holds_only_its_rows_of_the_head(model_dir, arch):
    path = model_dir(arch)
    config, index = read_config(path), tensor_index(path)
    rows, layer_range = 200, layer_ranges(SPLIT)[-1]
    stage, held, _ = held_by(lambda: load_stage(path, config, layer_range, with_head=False,
                                                head_share_rows=rows))
    head = "lm_head.weight" if "lm_head.weight" in index.nbytes else "model.embed_tokens.weight"
    expected = (sum(index.nbytes[n] for n in index.share(layer_range, with_head=False))
                + index.nbytes["model.norm.weight"]
                + index.nbytes[head] * rows // config["vocab_size"])
    assert within_5_percent(held, expected), (held, expected)


def test_dtype_cast_at_load(model_dir):
    path = model_dir("tiny-qwen2")
    stage = load_stage(path, read_config(path), (0, 2), with_head=True, dtype="float16")
    assert stage.layers[0].mlp.up_proj.weight.dtype == mx.float16


def test_truncated_weights_name_the_file(model_dir, tmp_path):
    src = model_dir("tiny-llama")
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="model.safetensors"):
        stage = load_stage(tmp_path, read_config(tmp_path), (0, 7), with_head=True)
        mx.eval(stage.layers[-1].parameters())


def test_config_errors(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no_such_arch"}))
    with pytest.raises(UnsupportedModel, match="unsupported model_type 'no_such_arch'"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(ModelError, match="does not describe an mlx-lm llama model"):
        read_config(tmp_path)
