"""`serve --concurrency 1`: one chat at a time through the conversation path, with speculative
decoding (prompt lookup) and the KV cache of the prefix shared with the previous request; the
text still equals single-process mlx-lm's greedy text."""

import queue
import re
import signal
import subprocess
import threading
import time

import pytest

from conftest import ROOT, mpi_env, pipeline_cmd
from test_serve import Served, encode

ARCH = "tiny-llama"
# Repeats itself, so prompt lookup has n-grams to propose from the first token on.
PROMPT = ("red green blue yellow red green blue yellow red green blue yellow red green blue "
          "yellow red green")


@pytest.fixture(scope="module")
def served(model_dir):
    proc = subprocess.Popen(
        pipeline_cmd(2, "serve", "--model", str(model_dir(ARCH)), "--port", "0",
                     "--concurrency", "1", "--max-queue", "2", "--num-draft-tokens", "4"),
        env={**mpi_env(), "PIPELINE_API_KEY": "k"}, cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    lines, err = queue.Queue(), []
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True).start()
    url, deadline = None, time.monotonic() + 180
    while url is None and time.monotonic() < deadline and proc.poll() is None:
        try:
            m = re.search(r"at (http://127\.0\.0\.1:\d+)/ ", lines.get(timeout=1))
            url = m and m.group(1)
        except queue.Empty:
            pass
    if url is None:
        proc.kill()
        pytest.fail("the server did not start:\n" + "".join(err))
    s = Served(proc, url, model_dir(ARCH), err, "")
    s.auth = {"Authorization": "Bearer k"}
    yield s
    proc.send_signal(signal.SIGUSR1)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def mlx_lm_text(path, prompt_ids, n):
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    model, tok = load(str(path))
    detok = tok.detokenizer
    for t, _ in generate_step(mx.array(prompt_ids), model, max_tokens=n,
                              sampler=lambda lp: mx.argmax(lp, axis=-1)):
        if int(t) in tok.eos_token_ids:
            break
        detok.add_token(int(t))
    detok.finalize()
    return detok.text, tok


def test_one_at_a_time_drafts_and_equals_mlx_lm(served):
    from mlx_lm import load

    tok = load(str(served.model))[1]
    prompt2 = None
    for prompt in (PROMPT, None):
        prompt = prompt or prompt2  # the second extends the first: its cache is kept
        status, body = served.request("POST", "/v1/completions", {
            "model": "m", "prompt": prompt, "max_tokens": 24, "temperature": 0})
        assert status == 200, body
        text, _ = mlx_lm_text(served.model, encode(tok, prompt, False), 24)
        assert body["choices"][0]["text"] == text
        prompt2 = prompt + text + " red green"
    spec = served.stats()["speculative"]
    assert spec["drafted"] > 0 and spec["passes"] > 0, spec
    assert spec["accepted"] <= spec["drafted"]
