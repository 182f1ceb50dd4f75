"""Whether a model can be split n ways in tensor parallel (Megatron-style, mlx-lm's `shard()`).

A group of n ranks gives each rank 1/n of every layer: of the attention heads (query and
key/value heads alike: each rank keeps whole KV heads), and of the MLP's columns (of each
expert's, in a mixture of experts). mlx-lm's `shard()` splits evenly, so every one of those
counts must divide by n; a quantized model also needs each rank's share of a sharded-to-all
projection's inputs (o_proj, down_proj) to hold whole quantization groups.
"""

from __future__ import annotations


def _get(config: dict, key: str):
    """A text model's field: top level, else a multimodal config's text_config."""
    value = config.get(key)
    if value is None and isinstance(config.get("text_config"), dict):
        value = config["text_config"].get(key)
    return value


def _indivisible(config: dict, n: int) -> list[str]:
    heads = _get(config, "num_attention_heads")
    kv_heads = _get(config, "num_key_value_heads") or heads
    counts = [(heads, f"{heads} attention heads"), (kv_heads, f"{kv_heads} KV heads"),
              (_get(config, "intermediate_size"), "MLP intermediate size")]
    moe = _get(config, "moe_intermediate_size")
    if moe:
        counts.append((moe, "expert intermediate size"))
    bad = [what if "heads" in what else f"{what} {value}"
           for value, what in counts if isinstance(value, int) and value % n]
    q = config.get("quantization") or config.get("quantization_config") or {}
    group = q.get("group_size", 64) if "bits" in q else None
    if group and not bad:
        head_dim = _get(config, "head_dim") or (_get(config, "hidden_size") or 0) // (heads or 1)
        for value, what in ((heads * head_dim if heads else None, "attention output width"),
                            (_get(config, "intermediate_size"), "MLP intermediate size"),
                            (moe, "expert intermediate size")):
            if isinstance(value, int) and value and (value // n) % group:
                bad.append(f"{what} {value} / {n} in whole quantization groups of {group}")
    return bad


def tp_problem(config: dict, n: int, shardable: bool = True) -> str | None:
    """Why this model cannot run a tensor-parallel group of n ranks, or None when it can.

    shardable: whether mlx-lm's model class has a `shard` method (`is_shardable`).
    """
    if n <= 1:
        return None
    kind = config.get("model_type", "?")
    if not shardable:
        return f"mlx-lm has no tensor-parallel split (shard) for model_type {kind}"
    bad = _indivisible(config, n)
    if not bad:
        return None
    fits = [m for m in range(n - 1, 1, -1) if not _indivisible(config, m)]
    fix = f"use --tp {fits[0]} or a pure pipeline" if fits else "use a pure pipeline (--tp 1)"
    listed = bad[0] if len(bad) == 1 else f"{', '.join(bad[:-1])} and {bad[-1]}"
    return f"{kind} has {listed}, not divisible by {n}: {fix}"


def is_shardable(config: dict) -> bool:
    """Whether mlx-lm's class for this model_type can split itself (has `shard`)."""
    try:
        from mlx_lm.utils import _get_classes  # follows mlx-lm's model_type remapping

        model_class, _ = _get_classes(config)
    except Exception:  # no module for this model_type, or it fails to import: no split
        return False
    return hasattr(model_class, "shard")
