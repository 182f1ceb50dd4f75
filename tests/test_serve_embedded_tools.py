"""Constrained decoding on the embedded model (SmolLM2-135M-Instruct, real weights) at 2 ranks,
through the official `openai` client: a forced tool call whose arguments validate against
the tool's schema (jsonschema), its result sent back, and the model's answer after it; then
20 random JSON schemas as response_format, every other one streamed, every answer valid for
its schema. SmolLM2's template knows no tools, so calls are in the generic form (chat.py)."""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor

import pytest

from test_serve import start_server, stop_server

pytestmark = pytest.mark.slow  # (start_server is imported: conftest does not see it)

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 20},
    "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now", "parameters": WEATHER}},
    {"type": "function", "function": {
        "name": "get_time", "description": "The time in a time zone", "parameters": {
            "type": "object", "properties": {"zone": {"type": "string", "maxLength": 8}},
            "required": ["zone"], "additionalProperties": False}}}]


@pytest.fixture(scope="module")
def server():
    from pipeline.model.spec import resolve_model

    # its folder given as --model: dequantized as the embedded model is by default on a CPU
    served = start_server(resolve_model(None), "--dequantize", "--concurrency", "8",
                          "--max-queue", "16")
    yield served
    stop_server(served)


def test_a_forced_tool_loop_on_the_embedded_model(server):
    import jsonschema

    client = server.client()
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(model="m", messages=messages, tools=TOOLS,
                                           tool_choice="required", parallel_tool_calls=False,
                                           temperature=0, max_tokens=100).choices[0]
    assert first.finish_reason == "tool_calls", first
    (call,) = first.message.tool_calls
    params = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, params[call.function.name])
    messages += [first.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 degrees."}]
    answer = client.chat.completions.create(model="m", messages=messages, tools=TOOLS,
                                            temperature=0, max_tokens=16).choices[0]
    assert answer.finish_reason in ("stop", "length")
    assert answer.message.content and not answer.message.tool_calls


def random_schema(rng: random.Random) -> dict:
    """An object of 1-3 required properties, each a bounded string, integer, boolean, enum
    or short array of digits (bounded: a small model must be able to finish it)."""
    kinds = [{"type": "string", "maxLength": 12},
             {"type": "integer", "minimum": 0, "maximum": 999},
             {"type": "boolean"},
             {"enum": ["red", "green", "blue"]},
             {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
              "maxItems": 3}]
    names = rng.sample(["name", "age", "color", "ok", "tags", "count", "label"], rng.randint(1, 3))
    return {"type": "object", "properties": {n: rng.choice(kinds) for n in names},
            "required": names, "additionalProperties": False}


def test_twenty_random_schemas_validate_streamed_or_not(server):
    import jsonschema

    client = server.client()
    rng = random.Random(26)
    schemas = [random_schema(rng) for _ in range(20)]

    def ask(job):
        i, stream = job
        body = dict(model="m", temperature=0, max_tokens=120, messages=[
            {"role": "user", "content": "Describe a person as JSON."}],
            response_format={"type": "json_schema", "json_schema": {
                "name": f"s{i}", "schema": schemas[i]}})
        if not stream:
            choice = client.chat.completions.create(**body).choices[0]
            return choice.message.content, choice.finish_reason
        text, reason = [], None
        for chunk in client.chat.completions.create(stream=True, **body):
            if chunk.choices:
                text.append(chunk.choices[0].delta.content or "")
                reason = chunk.choices[0].finish_reason or reason
        return "".join(text), reason

    jobs = [(i, i % 2 == 1) for i in range(20)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, jobs))
    for (i, stream), (text, reason) in zip(jobs, answers):
        assert reason == "stop", (i, stream, text)
        jsonschema.validate(json.loads(text), schemas[i])
