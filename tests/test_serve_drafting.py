"""`serve --concurrency 1`: one chat at a time through the conversation path, with speculative
decoding (prompt lookup) and the KV cache of the prefix shared with the previous request; the
text still equals single-process mlx-lm's greedy text."""

import pytest

from test_serve import encode, start_server, stop_server

ARCH = "tiny-llama"
# Repeats itself, so prompt lookup has n-grams to propose from the first token on.
PROMPT = ("red green blue yellow red green blue yellow red green blue yellow red green blue "
          "yellow red green")


@pytest.fixture(scope="module")
def served(model_dir):
    served = start_server(model_dir(ARCH), "--concurrency", "1", "--max-queue", "2",
                          "--num-draft-tokens", "4", api_key="k")
    yield served
    stop_server(served)


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


def test_logprobs_at_concurrency_one_go_through_the_engine(served):
    """Drafting has no logprobs: such a request runs through the batch engine instead; its
    text and log-probabilities equal mlx-lm's, and drafting goes on after it."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    from test_logprobs import mlx_lm_logprobs

    model, tok = load(str(served.model))
    ids = encode(tok, PROMPT, False)
    text, _ = mlx_lm_text(served.model, ids, 12)
    tokens = [int(t) for t, _ in generate_step(mx.array(ids), model, max_tokens=12,
                                               sampler=lambda lp: mx.argmax(lp, axis=-1))]
    drafted = served.stats()["speculative"]["drafted"]
    status, body = served.request("POST", "/v1/completions", {
        "model": "m", "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "logprobs": 2})
    assert status == 200, body
    choice = body["choices"][0]
    assert choice["text"] == text
    want = mlx_lm_logprobs(served.model, ids, tokens)
    assert choice["logprobs"]["token_logprobs"] == pytest.approx(
        [float(want[i][t]) for i, t in enumerate(tokens)], abs=1e-4)
    assert served.stats()["speculative"]["drafted"] == drafted  # not drafted
    status, body = served.request("POST", "/v1/completions", {
        "model": "m", "prompt": PROMPT, "max_tokens": 12, "temperature": 0})
    assert status == 200 and body["choices"][0]["text"] == text
    assert served.stats()["speculative"]["drafted"] > drafted
