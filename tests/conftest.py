"""Shared fixtures: tiny real models (built once per session) and a real mpirun launcher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MPIRUN = str(BIN / "mpirun")
ARCHS = ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-gemma3", "tiny-phi3",
         # mixtures of experts, and qwen3_next's hybrid of linear (recurrent) and full attention
         "tiny-qwen3-moe", "tiny-deepseek-v3", "tiny-glm4-moe", "tiny-gpt-oss", "tiny-mixtral",
         "tiny-qwen3-next"]


def mpi_env() -> dict:
    env = dict(os.environ)
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def pipeline_cmd(np_: int, *args: str) -> list[str]:
    """`python -m pipeline ARGS`, under mpirun when np_ > 0 (0: no mpirun at all)."""
    py = [sys.executable, "-m", "pipeline", *args]
    if np_ == 0:
        return py
    return [MPIRUN, "-np", str(np_), "--oversubscribe", "--bind-to", "none", *py]


def run_pipeline(np_: int, *args: str, timeout: float = 240, input: str | None = None,
                 env_extra: dict | None = None):
    return subprocess.run(pipeline_cmd(np_, *args), capture_output=True, text=True,
                          timeout=timeout, env={**mpi_env(), **(env_extra or {})}, cwd=ROOT,
                          input=input)


def run_json(np_: int, *args: str) -> dict:
    proc = run_pipeline(np_, *args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """model_dir(preset, **kw) -> folder of a tiny random model, built once per session."""
    from pipeline.model.make_model import make_model

    made: dict = {}

    def get(like: str, **kw) -> Path:
        key = (like, tuple(sorted(kw.items())))
        if key not in made:
            name = like + "".join(f"-{k}{v}" for k, v in sorted(kw.items()))
            made[key] = make_model(like, tmp_path_factory.mktemp(name), **kw)
        return made[key]

    return get


@pytest.fixture
def on_cpu():
    """The test's MLX products run on the CPU. Bit-for-bit claims are about the CPU kernels
    (OpenBLAS, Accelerate); on a Mac the default device is the GPU, whose kernels differ."""
    import mlx.core as mx

    with mx.stream(mx.cpu):
        yield


def reference_tokens(path: Path, prompt_ids: list[int], n: int, dequantize: bool = False) -> list[int]:
    """The oracle: greedy tokens of single-process mlx-lm on the same model and prompt."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import dequantize_model

    model, _ = load(str(path))
    if dequantize:
        model = dequantize_model(model)
    steps = generate_step(mx.array(prompt_ids), model, max_tokens=n,
                          sampler=lambda logprobs: mx.argmax(logprobs, axis=-1))
    return [int(tok) for tok, _ in steps]


def mlx_lm_prompt_ids(tokenizer, prompt: str, chat: bool | None, system: str | None = None
                      ) -> list[int]:
    """Prompt ids made the way `mlx_lm.generate` makes them, with mlx-lm's own tokenizer:
    chat (None: when it has a template): the template as text, encoded without special
    tokens; else the plain prompt encoded with them (its --ignore-chat-template)."""
    if chat is None:
        chat = tokenizer.has_chat_template
    if not chat:
        return list(tokenizer.encode(prompt, add_special_tokens=True))
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages.append({"role": "user", "content": prompt})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer.encode(text, add_special_tokens=False))


def mlx_lm_oracle(path: Path, prompt: str, n: int, chat: bool | None = False,
                  system: str | None = None, dequantize: bool = False,
                  cast: str | None = None) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy tokens) of single-process mlx-lm given the prompt TEXT: it loads
    the model (`mlx_lm.load`: every tensor in the checkpoint's dtype) and tokenizes itself.
    dequantize: as mlx-lm's dequantize_model; cast: every floating parameter to this dtype
    (what the pipeline's --dtype does), e.g. "float32" for a CPU run's default."""
    import mlx.core as mx
    from mlx.utils import tree_map
    from mlx_lm import load
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import dequantize_model

    model, tokenizer = load(str(path))
    if dequantize:
        model = dequantize_model(model)
    if cast is not None:
        dtype = getattr(mx, cast)
        model.update(tree_map(
            lambda a: a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) else a,
            model.parameters()))
    ids = mlx_lm_prompt_ids(tokenizer, prompt, chat, system)
    steps = generate_step(mx.array(ids), model, max_tokens=n,
                          sampler=lambda logprobs: mx.argmax(logprobs, axis=-1))
    return ids, [int(tok) for tok, _ in steps]


def launch_checkout(where: Path, venv: Path) -> Path:
    """launch/mpirun as a checkout at `where` with `venv` as its .venv runs it (where/launch/mpirun
    links to the real script, where/.venv to venv); returns the script's path there. The script
    takes its mpirun and --prefix from the .venv beside it, which this checkout may lack."""
    (where / "launch").mkdir(parents=True)
    (where / "launch" / "mpirun").symlink_to(ROOT / "launch" / "mpirun")
    (where / ".venv").symlink_to(venv, target_is_directory=True)
    return where / "launch" / "mpirun"


# A test that starts processes (mpirun, a pipeline subprocess, a server) is marked `slow`,
# so that `pytest -m "not slow"` runs the in-process tests in about a minute. Decided from the
# test's source: it names one of these, or takes a fixture that starts processes.
_STARTS_PROCESSES = ("run_pipeline", "run_json", "pipeline_cmd", "MPIRUN", "subprocess",
                     "Popen", "netns_json", "LAUNCH")
_PROCESS_FIXTURES = {"server", "served", "three_hosts", "two_hosts", "netns_ok", "ssh_cluster"}


def pytest_collection_modifyitems(config, items):
    import inspect

    for item in items:
        fn = getattr(item, "function", None)
        if fn is None:
            continue
        helpers = {name for name, obj in vars(item.module).items()
                   if inspect.isfunction(obj) and obj.__module__ == item.module.__name__
                   and not name.startswith("test_")
                   and any(k in inspect.getsource(obj) for k in _STARTS_PROCESSES)}
        src = inspect.getsource(fn)
        if (any(k in src for k in _STARTS_PROCESSES) or any(f"{h}(" in src for h in helpers)
                or _PROCESS_FIXTURES & set(item.fixturenames)):
            item.add_marker(pytest.mark.slow)
