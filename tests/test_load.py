"""Each rank materializes exactly its share of the tensors, and nothing else."""

import json

import mlx.core as mx
import pytest

from pipeline.model.load import ModelError, layer_of, load_stage, read_config, resident_bytes, tensor_index
from pipeline.place.split import layer_ranges


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gemma3", "tiny-phi3"])
@pytest.mark.parametrize("shards", [1, 3])
def test_rank_loads_exactly_its_share(model_dir, arch, shards):
    path = model_dir(arch, shards=shards) if shards > 1 else model_dir(arch)
    config = read_config(path)
    index = tensor_index(path)
    for rank, layer_range in enumerate(layer_ranges([2, 3, 2])):
        stage = load_stage(path, config, layer_range, with_head=rank == 0)
        share = index.share(layer_range, with_head=rank == 0)
        assert stage.loaded_names == share
        layers = {layer_of(n) for n in stage.loaded_names}
        assert layers - {None} == set(range(*layer_range))
        assert (None in layers) == (rank == 0)  # embedding/norm/head only on rank 0
        share_bytes = sum(index.nbytes[n] for n in share)
        assert resident_bytes(stage) <= 1.05 * share_bytes


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
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba", "num_hidden_layers": 2}))
    with pytest.raises(ValueError, match="unsupported model_type 'mamba'"):
        read_config(tmp_path)
