"""The openai-agents SDK against `serve` at 2 ranks: an Agent with two function tools runs to
its final output through the Responses API (the SDK's default model) and through chat
completions. The scripted agent model (tests/scripted.py) calls both tools in its first answer;
the SDK runs them and sends their results back; then the model answers "Done."."""

from __future__ import annotations

import asyncio

import pytest

from scripted import scripted_agent_model  # noqa: F401 (a fixture)
from test_serve import API_KEY, start_server, stop_server

pytestmark = pytest.mark.slow  # (start_server is imported: conftest does not see it)


@pytest.fixture(scope="module")
def server(scripted_agent_model):
    served = start_server(scripted_agent_model)
    yield served
    stop_server(served)


def run_agent(server, api: str) -> tuple[str, list]:
    from agents import (Agent, OpenAIChatCompletionsModel, OpenAIResponsesModel, Runner,
                        function_tool, set_tracing_disabled)
    from openai import AsyncOpenAI

    set_tracing_disabled(True)  # no export to OpenAI's tracing service
    ran = []

    @function_tool
    def Bash(command: str, description: str) -> str:  # noqa: N802 (Claude Code's tool name)
        """Run a shell command."""
        ran.append(("Bash", command))
        return "ok"

    @function_tool
    def exec_command(cmd: str) -> str:
        """Run a command (Codex's tool)."""
        ran.append(("exec_command", cmd))
        return "ok"

    client = AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    kind = OpenAIResponsesModel if api == "responses" else OpenAIChatCompletionsModel
    agent = Agent(name="marker", instructions="Write the marker file.",
                  tools=[Bash, exec_command], model=kind(model="m", openai_client=client))

    async def go():
        try:
            return await Runner.run(agent, "Write the marker file.", max_turns=4)
        finally:
            await client.close()

    result = asyncio.run(go())
    return result.final_output, ran


@pytest.mark.parametrize("api", ["responses", "chat"])
def test_an_agent_runs_its_tools_to_the_final_output(server, api):
    final, ran = run_agent(server, api)
    assert final == "Done."
    assert sorted(ran) == [("Bash", "echo pipeline-ok > cc-marker.txt"),
                           ("exec_command", "echo pipeline-ok > cx-marker.txt")]
