"""`serve` over a real 2-rank mpirun: the official openai client (stream and not) against one-shot
output, 8 concurrent clients against the oracle, bad requests, a client that disconnects,
overload, the chat page in headless Chromium, and Ctrl-C. One server for the whole module,
started with an API key (PIPELINE_API_KEY) that every request below sends, but those that test
the 401s."""

import http.client
import json
import os
import queue
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import ROOT, mpi_env, pipeline_cmd, run_json, run_pipeline
from helpers import processes

ARCH = "tiny-llama"
CONCURRENCY, MAX_QUEUE = 4, 4  # so 8 requests fit and a 9th is refused
PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
MARKER = b"--max-queue\x00" + str(MAX_QUEUE).encode()  # in this module's server command lines
API_KEY = "sk-pipeline-test-0123"  # the module server's PIPELINE_API_KEY


class Served:
    def __init__(self, proc, url, model, err, banner):
        self.proc, self.url, self.model, self.err, self.banner = proc, url, model, err, banner
        self.host, self.port = url.removeprefix("http://").split(":")
        self.auth = {"Authorization": f"Bearer {API_KEY}"}

    def client(self, api_key=API_KEY):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=120)

    def request(self, method, path, body=None, raw=None, auth=None):
        """(status, decoded JSON body) of one plain HTTP request; `auth`: the Authorization
        header (default: the right key; "": none)."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        headers = {"Content-Type": "application/json", **self.auth}
        if auth is not None:
            headers.pop("Authorization")
            headers.update({"Authorization": auth} if auth else {})
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def stats(self):
        return self.request("GET", "/stats")[1]

    def open_stream(self, body):
        """A chat stream left open: (connection, response) once the headers are in."""
        conn = http.client.HTTPConnection(self.host, int(self.port), timeout=120)
        conn.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": True}),
                     {"Content-Type": "application/json", **self.auth})
        return conn, conn.getresponse()

    def wait_idle(self, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.stats()["requests"]
            if s["active"] == 0 and s["running"] == 0 and s["queued"] == 0:
                return
            time.sleep(0.1)
        pytest.fail(f"the server did not go idle: {self.stats()['requests']}")


def hang_up(conn):
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()


def sse_events(resp, n):
    """The first n data payloads of an event stream."""
    events = []
    while len(events) < n:
        line = resp.readline().decode()
        assert line, "the stream ended early"
        if line.startswith("data: "):
            events.append(line[6:].strip())
    return events


def start_server(model, *flags, api_key=API_KEY) -> "Served":
    """`serve --port 0 FLAGS` over a 2-rank mpirun, once its banner names the URL."""
    proc = subprocess.Popen(
        pipeline_cmd(2, "serve", "--model", str(model), "--port", "0", *flags),
        env={**mpi_env(), "PIPELINE_API_KEY": api_key}, cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    lines, err = queue.Queue(), []
    threading.Thread(target=lambda: [lines.put(l) for l in proc.stdout], daemon=True).start()
    threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True).start()
    url, banner, deadline = None, "", time.monotonic() + 180
    while url is None and time.monotonic() < deadline and proc.poll() is None:
        try:
            banner = lines.get(timeout=1)
            m = re.search(r"at (http://127\.0\.0\.1:\d+)/ ", banner)
            url = m and m.group(1)
        except queue.Empty:
            pass
    if url is None:
        proc.kill()
        pytest.fail("the server did not start:\n" + "".join(err))
    served = Served(proc, url, model, err, banner)
    served.auth = {"Authorization": f"Bearer {api_key}"}
    return served


def stop_server(served: "Served") -> None:
    """launch/mpirun's Ctrl-C (SIGUSR1) to every rank; kill after 30 s."""
    if served.proc.poll() is None:
        served.proc.send_signal(signal.SIGUSR1)
        try:
            served.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            served.proc.kill()
            served.proc.wait()


@pytest.fixture(scope="module")
def server(model_dir):
    served = start_server(model_dir(ARCH), "--concurrency", str(CONCURRENCY), "--max-queue",
                          str(MAX_QUEUE))
    yield served
    stop_server(served)


@pytest.fixture(scope="module")
def oracle(model_dir):
    """oracle(prompt_ids, n) -> (text, tokens): single-process mlx-lm, greedy, up to EOS."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    model, tok = load(str(model_dir(ARCH)))

    def answer(prompt_ids, n):
        tokens = []
        for t, _ in generate_step(mx.array(prompt_ids), model, max_tokens=n,
                                  sampler=lambda lp: mx.argmax(lp, axis=-1)):
            tokens.append(int(t))
            if tokens[-1] in tok.eos_token_ids:
                break
        detok = tok.detokenizer
        for t in tokens:
            if t not in tok.eos_token_ids:
                detok.add_token(t)
        detok.finalize()
        return detok.text, tokens

    answer.tokenizer = tok
    return answer


def encode(tok, text, chat):
    from pipeline.model.prompt import encode as encode_messages

    return encode_messages(tok, [{"role": "user", "content": text}], chat)


def test_models_health_and_per_rank_stats(server):
    assert [m.id for m in server.client().models.list().data] == [server.model.name]
    assert server.request("GET", "/health") == (200, {"status": "ok"})
    stats = server.stats()
    ranks = stats["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    (a, b), (c, d) = ranks[0]["layer_range"], ranks[1]["layer_range"]
    assert a == 0 and b == c and d == 7  # tiny-llama's 7 layers, all placed once
    assert all(r["host"] and r["weight_bytes"] > 0 for r in ranks)
    assert stats["limits"] == {"concurrency": CONCURRENCY, "max_queue": MAX_QUEUE}


@pytest.fixture(scope="module")
def one_shot(server):
    """`python -m pipeline --prompt PROMPT --temp 0 --json` on 2 ranks, with and without the
    chat template (one after the other: ranks busy-wait, so two jobs at once only contend)."""
    return {chat: run_json(2, "--model", str(server.model), "--prompt", PROMPT, "--temp", "0",
                           "--max-tokens", "24", *([] if chat else ["--no-chat"]))
            for chat in (True, False)}


@pytest.mark.parametrize("chat", [True, False])
def test_openai_client_greedy_equals_one_shot(server, one_shot, chat):
    one_shot = one_shot[chat]
    assert len(one_shot["tokens"]) > 3, "degenerate output makes the comparison weak"
    client, params = server.client(), {"model": server.model.name, "max_tokens": 24,
                                       "temperature": 0}
    if chat:
        create = client.chat.completions.create
        params["messages"] = [{"role": "user", "content": PROMPT}]
    else:
        create = client.completions.create
        params["prompt"] = PROMPT
    got = create(**params)
    choice = got.choices[0]
    assert (choice.message.content if chat else choice.text) == one_shot["completion"]
    assert choice.finish_reason == one_shot["finish_reason"]
    assert got.usage.prompt_tokens == len(one_shot["prompt_ids"])
    assert got.usage.completion_tokens == len(one_shot["tokens"])
    assert got.object == ("chat.completion" if chat else "text_completion")

    pieces, reasons, usage = [], [], None
    for event in create(**params, stream=True, stream_options={"include_usage": True}):
        if event.usage is not None:
            usage = event.usage
        for c in event.choices:
            piece = c.delta.content if chat else c.text
            pieces.append(piece or "")
            reasons.append(c.finish_reason)
    assert "".join(pieces) == one_shot["completion"]
    assert sum(1 for p in pieces if p) > 1, "the answer came in one piece: not streamed"
    assert reasons[-1] == one_shot["finish_reason"] and not any(reasons[:-1])
    assert usage.completion_tokens == len(one_shot["tokens"])


def test_messages_and_responses_greedy_equal_one_shot(server, one_shot):
    """The same conversation through Anthropic's Messages API (its official client, with
    x-api-key) and OpenAI's Responses API: the one-shot run's text and token counts."""
    from anthropic import Anthropic

    one_shot = one_shot[True]
    messages = [{"role": "user", "content": PROMPT}]
    client = Anthropic(base_url=server.url, api_key=API_KEY, max_retries=0, timeout=120)
    got = client.messages.create(model="m", max_tokens=24, messages=messages,
                                 extra_body={"temperature": 0})
    assert "".join(b.text for b in got.content) == one_shot["completion"]
    # (Anthropic counts prompt-cache reads apart: an earlier test sent this prompt)
    assert got.usage.input_tokens + got.usage.cache_read_input_tokens == len(
        one_shot["prompt_ids"])
    assert got.usage.output_tokens == len(one_shot["tokens"])
    assert got.stop_reason == {"length": "max_tokens", "stop": "end_turn"}[
        one_shot["finish_reason"]]
    resp = server.client().responses.create(model="m", input=PROMPT, max_output_tokens=24,
                                            temperature=0)
    assert resp.output_text == one_shot["completion"]
    assert (resp.usage.input_tokens, resp.usage.output_tokens) == (
        len(one_shot["prompt_ids"]), len(one_shot["tokens"]))
    assert resp.status == ("incomplete" if one_shot["finish_reason"] == "length" else
                           "completed")


def test_eight_concurrent_clients_all_correct(server, oracle):
    server.wait_idle()
    prompts = [f"{w} and then the story goes on" for w in
               ("hello", "Once upon a time", "a", "The weather today", "what is the answer",
                "x y z", "in the end", "many words make a longer prompt than the others")]
    client, barrier = server.client(), threading.Barrier(len(prompts))

    def ask(i):
        params = {"model": "any", "prompt": prompts[i], "max_tokens": 8 + 3 * i, "temperature": 0}
        barrier.wait()
        if i % 2:  # half of them stream
            events = list(client.completions.create(**params, stream=True))
            return "".join(e.choices[0].text for e in events), events[-1].choices[0].finish_reason
        got = client.completions.create(**params)
        return got.choices[0].text, got.choices[0].finish_reason

    served = server.stats()["requests"]["served"]
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(ask, range(len(prompts))))
    for i, (text, reason) in enumerate(results):
        expected, tokens = oracle(encode(oracle.tokenizer, prompts[i], False), 8 + 3 * i)
        assert text == expected, f"client {i}"
        assert reason == ("length" if len(tokens) == 8 + 3 * i else "stop")
    assert server.stats()["requests"]["served"] == served + len(prompts)


def test_the_next_turn_comes_from_the_prompt_cache(server, oracle):
    """A conversation's second turn starts with the first turn's prompt and answer: the prompt
    cache (on by default) gives those tokens, usage and /stats say so, and the answer is still
    the oracle's, token for token."""
    from pipeline.model.prompt import encode as encode_messages

    server.wait_idle()
    client, before = server.client(), server.stats()["prompt_cache"]
    messages = [{"role": "user", "content": "Tell me a story about a fox and a dog"}]
    params = {"model": server.model.name, "max_tokens": 10, "temperature": 0}
    first = client.chat.completions.create(messages=messages, **params)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And then?"}]
    second = client.chat.completions.create(messages=messages, **params)
    first_ids = encode_messages(oracle.tokenizer, messages[:1], True)
    ids = encode_messages(oracle.tokenizer, messages, True)
    assert ids[:len(first_ids)] == first_ids  # the template renders turn 1 the same way
    assert second.choices[0].message.content == oracle(ids, 10)[0]
    assert second.usage.prompt_tokens == len(ids)
    assert len(first_ids) <= second.usage.prompt_tokens_details.cached_tokens < len(ids)
    # the same conversation through Anthropic's Messages API: its answer's tokens are cached too
    status, third = server.request("POST", "/v1/messages", {
        "model": server.model.name, "max_tokens": 10, "temperature": 0, "messages": messages})
    assert status == 200, third
    assert "".join(b["text"] for b in third["content"]) == oracle(ids, 10)[0]
    usage = third["usage"]
    assert usage["input_tokens"] + usage["cache_read_input_tokens"] == len(ids)
    assert usage["cache_read_input_tokens"] == len(ids) - 1  # all but the last prompt token
    after = server.stats()["prompt_cache"]
    assert after["hits"] > before["hits"] and after["entries"] >= 1
    assert 0 < after["bytes"] <= after["budget_bytes"]
    assert after["cached_tokens"] >= before["cached_tokens"] + len(first_ids)


def test_stop_strings_and_seeded_sampling(server, oracle):
    text, _ = oracle(encode(oracle.tokenizer, PROMPT, False), 24)
    stop = text[6:9]
    assert len(text) > 12 and stop
    client = server.client()
    params = {"model": "m", "prompt": PROMPT, "max_tokens": 24, "temperature": 0}
    got = client.completions.create(**params, stop=[stop, "never-there"])
    assert got.choices[0].text == text[: text.find(stop)]
    assert got.choices[0].finish_reason == "stop"
    events = list(client.completions.create(**params, stop=stop, stream=True))
    assert "".join(e.choices[0].text for e in events) == text[: text.find(stop)]
    assert events[-1].choices[0].finish_reason == "stop"

    for seed in (7, -7):  # a seed makes sampling repeatable (a negative one too)
        sampled = [client.completions.create(model="m", prompt=PROMPT, max_tokens=12,
                                             temperature=1.0, top_p=0.9, seed=seed)
                   .choices[0].text for _ in range(2)]
        assert sampled[0] == sampled[1]


HI = [{"role": "user", "content": "hi"}]
BAD = [
    ("/v1/chat/completions", b"{not json", None),
    ("/v1/chat/completions", {"model": "m"}, "messages"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]},
     "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": HI, "temperature": -1}, "temperature"),
    ("/v1/chat/completions", {"messages": HI, "temperature": 2.5}, "temperature"),
    ("/v1/chat/completions", {"messages": HI, "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"messages": HI, "max_completion_tokens": 1.5},
     "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": HI, "n": 2}, "n"),
    ("/v1/chat/completions", {"messages": HI, "top_p": 0}, "top_p"),
    ("/v1/chat/completions", {"messages": HI, "min_p": 1}, "min_p"),
    ("/v1/chat/completions", {"messages": HI, "stream_options": 1}, "stream_options"),
    ("/v1/completions", {"prompt": "hi", "stop": 5}, "stop"),
    ("/v1/completions", {"prompt": "hi", "seed": "x"}, "seed"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": {"a": 1}}, "prompt"),
    ("/v1/completions", {"prompt": ["one", "two"]}, "prompt"),
    ("/v1/completions", {"prompt": [1, 2, 10**9]}, "prompt"),
    ("/v1/completions", [1, 2], None),
]


def test_bad_requests_get_400_with_an_openai_error_body(server):
    for path, body, param in BAD:
        raw = body if isinstance(body, bytes) else None
        status, got = server.request("POST", path, None if raw else body, raw)
        assert status == 400, (body, got)
        assert got["error"]["type"] == "invalid_request_error" and got["error"]["message"]
        assert got["error"]["param"] == param, (body, got)

    too_long = " ".join(["word"] * 2100)  # more tokens than the 2048-token context
    status, got = server.request("POST", "/v1/completions", {"prompt": too_long})
    assert status == 400 and got["error"]["code"] == "context_length_exceeded"
    assert "context window is 2048 tokens" in got["error"]["message"]
    status, got = server.request("POST", "/v1/chat/completions",
                                 {"messages": HI, "max_tokens": 5000})
    assert status == 400 and got["error"]["code"] == "context_length_exceeded"

    import openai

    with pytest.raises(openai.BadRequestError) as e:
        server.client().chat.completions.create(
            model="m", messages=[{"role": "user", "content": too_long}])
    assert e.value.status_code == 400 and "context window" in str(e.value)
    status, got = server.request("GET", "/v1/nothing")
    assert status == 404 and got["error"]["type"] == "not_found_error"
    assert server.request("GET", "/health")[0] == 200


def test_without_the_api_key_every_route_but_the_page_gets_401(server):
    import openai

    assert "API key required" in server.banner and API_KEY not in server.banner
    assert API_KEY not in "".join(server.err)
    served = server.stats()["requests"]["served"]
    for auth in ("", "Bearer not-the-key", f"Bearer {API_KEY}x", f"Basic {API_KEY}"):
        for method, path, body in (("GET", "/v1/models", None), ("GET", "/stats", None),
                                   ("POST", "/v1/chat/completions", {"messages": HI}),
                                   ("POST", "/v1/completions", {"prompt": "hi"}),
                                   ("GET", "/v1/nothing", None)):
            status, got = server.request(method, path, body, auth=auth)
            assert status == 401, (auth, path, got)
            assert set(got) == {"error"} and got["error"]["message"], got
            assert {k: got["error"][k] for k in ("type", "param", "code")} == {
                "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}
            assert API_KEY not in got["error"]["message"]
    for auth in ("", "Bearer not-the-key"):  # the Messages API answers in its own shape
        status, got = server.request("POST", "/v1/messages", {"messages": HI}, auth=auth)
        assert status == 401 and got["type"] == "error", got
        assert got["error"]["type"] == "authentication_error" and got["error"]["message"]
    for path in ("/", "/static/chat.js", "/health"):  # no secrets there
        with urllib.request.urlopen(server.url + path, timeout=30) as r:
            assert r.status == 200, path

    wrong = server.client(api_key="not-the-key")
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.chat.completions.create(model="m", messages=HI, max_tokens=4)
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    assert e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.AuthenticationError):
        list(wrong.completions.create(model="m", prompt="hi", max_tokens=4, stream=True))
    assert server.stats()["requests"]["served"] == served  # nothing was generated


def test_api_key_checks_without_mpi(monkeypatch):
    """The key's rules, and that a server without a key stays open (the module's has one)."""
    import asyncio
    from types import SimpleNamespace

    from pipeline.serve.http import make_app
    from pipeline.serve.server import check_api_key

    def get(app, path, auth=None):
        sent = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        headers = [(b"authorization", auth.encode())] if auth else []
        asyncio.run(app({"type": "http", "method": "GET", "path": path, "raw_path": path.encode(),
                         "query_string": b"", "root_path": "", "headers": headers,
                         "scheme": "http", "server": ("127.0.0.1", 80)}, receive, send))
        return sent[0]["status"]

    state = SimpleNamespace(model="m", created=0, context=64, closing=False)
    assert get(make_app(state), "/v1/models") == 200
    keyed = make_app(state, "k")
    assert (get(keyed, "/v1/models"), get(keyed, "/v1/models", "bearer k")) == (401, 200)
    assert get(keyed, "/health") == 200

    monkeypatch.delenv("PIPELINE_API_KEY", raising=False)
    assert check_api_key(None) is None and check_api_key("sk-1") == "sk-1"
    for bad in ("", "two words", "clé", "tab\t"):
        with pytest.raises(ValueError):
            check_api_key(bad)
    monkeypatch.setenv("PIPELINE_API_KEY", "")  # click takes an empty variable as unset
    with pytest.raises(ValueError, match="PIPELINE_API_KEY is set but empty"):
        check_api_key(None)


def test_client_disconnect_mid_stream_frees_its_slot(server, oracle):
    server.wait_idle()
    before = server.stats()["engine_tokens"]
    conn, resp = server.open_stream({"messages": [{"role": "user", "content": "go on"}],
                                     "max_tokens": 2000, "ignore_eos": True, "temperature": 0})
    assert resp.status == 200
    sse_events(resp, 6)  # the role event, then tokens: generation is under way
    hang_up(conn)
    server.wait_idle()
    made = server.stats()["engine_tokens"] - before
    assert made < 1000, f"{made} tokens: the engine kept generating for a client that left"
    # every rank dropped it: the next answers are still exact
    expected, _ = oracle(encode(oracle.tokenizer, PROMPT, False), 16)
    got = server.client().completions.create(model="m", prompt=PROMPT, max_tokens=16,
                                             temperature=0)
    assert got.choices[0].text == expected


def test_overload_gets_429_and_hung_up_streams_free_the_queue(server, oracle):
    import openai

    server.wait_idle()
    streams = []
    try:
        for i in range(CONCURRENCY + MAX_QUEUE):  # fill every slot and the queue
            conn, resp = server.open_stream({"messages": [{"role": "user", "content": f"n{i}"}],
                                             "max_tokens": 2000, "ignore_eos": True})
            assert resp.status == 200
            streams.append(conn)
        status, got = server.request("POST", "/v1/completions", {"prompt": "one more"})
        assert status == 429, got
        assert got["error"]["code"] == "queue_full" and "--max-queue" in got["error"]["message"]
        with pytest.raises(openai.RateLimitError):
            server.client().completions.create(model="m", prompt="and another", max_tokens=2)
        requests = server.stats()["requests"]
        assert requests["active"] == CONCURRENCY + MAX_QUEUE and requests["rejected"] >= 2
    finally:
        for conn in streams:
            hang_up(conn)
    server.wait_idle()
    expected, _ = oracle(encode(oracle.tokenizer, "after the storm", False), 10)
    got = server.client().completions.create(model="m", prompt="after the storm", max_tokens=10,
                                             temperature=0)
    assert got.choices[0].text == expected


def test_chat_page_in_headless_chromium_streams_an_answer(server, oracle, tmp_path):
    if not os.path.exists(CHROMIUM):
        print(f"skipped: no {CHROMIUM} (apt-get install -y chromium; .ci/run installs it)")
        pytest.skip(f"no {CHROMIUM}: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    expected, _ = oracle(encode(oracle.tokenizer, PROMPT, True), 24)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            page.wait_for_selector("#key-form:not([hidden])")  # /stats said 401: it asks
            assert "needs an API key" in page.text_content("#key-message")
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "24")
            page.fill("#prompt", PROMPT)
            page.press("#prompt", "Enter")  # sent without a key: refused, the text comes back
            page.wait_for_function(f"document.getElementById('prompt').value === {PROMPT!r}")
            assert page.locator(".msg").count() == 0 and page.is_visible("#key-form")
            page.fill("#api-key", "not-the-key")
            page.press("#api-key", "Enter")
            page.wait_for_function("!document.getElementById('key-form').hidden && "
                                   "document.getElementById('key-message').textContent"
                                   ".includes('refused')")
            page.fill("#api-key", API_KEY)
            page.press("#api-key", "Enter")
            page.wait_for_function(
                "document.getElementById('cluster').textContent.includes('2 ranks')")
            assert page.is_hidden("#key-form")
            assert "layers per rank 3 + 4" in page.text_content("#cluster")
            assert page.text_content("#model") == server.model.name
            page.press("#prompt", "Enter")
            page.wait_for_selector(".msg.assistant[data-done='1']", timeout=60_000)
            answer = page.locator(".msg.assistant").last
            assert answer.text_content() == expected
            assert int(answer.get_attribute("data-chunks")) > 1, "not streamed"
            assert page.text_content(".msg.user") == PROMPT
            page.wait_for_function("document.getElementById('speed').textContent.includes('tok/s')")
            page.screenshot(path=str(tmp_path / "chat.png"))
            page.reload()  # the key stays for this tab: no question this time
            page.wait_for_function(
                "document.getElementById('cluster').textContent.includes('2 ranks')")
            assert page.is_hidden("#key-form")
        finally:
            browser.close()


def _ranks_alive():
    return [p.pid for p in processes()
            if MARKER in p.cmd and b"python" in p.cmd and b"serve" in p.cmd]


def test_ctrl_c_mid_stream_ends_every_rank(server):
    """launch/mpirun turns Ctrl-C into SIGUSR1 for every rank: the server stops cleanly."""
    conn, resp = server.open_stream({"messages": [{"role": "user", "content": "go"}],
                                     "max_tokens": 2000, "ignore_eos": True})
    sse_events(resp, 3)
    server.proc.send_signal(signal.SIGUSR1)
    rest = resp.read().decode()  # the stream ends (the answer is cut), it does not hang
    assert rest.rstrip().endswith("data: [DONE]")
    conn.close()
    assert server.proc.wait(timeout=30) == 0, "".join(server.err)
    time.sleep(0.5)
    assert "pipeline: server stopped" in "".join(server.err)
    assert _ranks_alive() == []


def test_serve_flag_and_port_errors(model_dir):
    proc = run_pipeline(0, "serve", "--max-queue", "-1", timeout=60)
    assert proc.returncode == 2 and "pipeline: error: --concurrency" in proc.stderr
    proc = run_pipeline(0, "serve", "--prompt-cache-bytes", "lots", timeout=60)
    assert proc.returncode == 2 and "pipeline: error: --prompt-cache-bytes: 'lots'" in proc.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_pipeline(2, "serve", "--model", str(model_dir(ARCH)), "--port", str(port),
                            "--verbose", timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"pipeline: error: cannot listen on 127.0.0.1:{port}" in proc.stderr
    assert "loading layers" not in proc.stderr  # refused before any rank loads the model
    proc = run_pipeline(2, "serve", "--model", str(model_dir(ARCH)), "--api-key", "",
                        "--verbose", timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("pipeline: error: --api-key is empty") == 1, proc.stderr
    assert "loading layers" not in proc.stderr


def test_non_loopback_address_is_flagged():
    from pipeline.serve.server import _url

    for host, loopback in (("127.0.0.1", True), ("0.0.0.0", False)):
        with socket.socket() as s:
            s.bind((host, 0))  # bound only: nothing listens or connects
            assert _url(s)[1] is loopback


def test_stop_text_never_sends_part_of_a_stop_string():
    from pipeline.serve.api import StopText

    stops = StopText(["END", "\n\n"])
    sent = [stops.feed(piece) for piece in ["hello E", "N", "x more\n", "te", "xt EN", "D tail"]]
    assert sent == [("hello ", False), ("", False), ("ENx more", False), ("\nte", False),
                    ("xt ", False), ("", True)]
    assert StopText(["abc"]).feed("xxabc yy") == ("xx", True)
    tail = StopText(["abc"])
    assert tail.feed("zab") == ("z", False) and tail.flush() == "ab"
