"""Real agent CLIs against `serve` over a real 2-rank mpirun: Claude Code (headless, Anthropic
Messages API) and Codex CLI (`codex exec`, OpenAI Responses API) each complete one tool round
trip on the scripted agent model (tests/scripted.py): the model calls the client's shell tool,
the client runs it (a marker file appears), sends the result back, and the model's answer to
that ("Done.") ends the run. Both CLIs come from the npm registry, at the versions below; the
test skips, saying so, where node and npm are absent."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from scripted import scripted_agent_model  # noqa: F401 (a fixture)
from test_serve import API_KEY, start_server, stop_server

CLAUDE_CODE = "@anthropic-ai/claude-code@2.1.197"
CODEX = "@openai/codex@0.171.0"
TASK = "Write the marker file."

pytestmark = pytest.mark.skipif(not (shutil.which("node") and shutil.which("npm")),
                                reason="node and npm are needed to install the agent CLIs")


@pytest.fixture(scope="module")
def clis(tmp_path_factory):
    """Both CLIs installed from the npm registry into a folder of their own."""
    where = tmp_path_factory.mktemp("agent-clis")
    done = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(where),
                           CLAUDE_CODE, CODEX], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"npm install failed:\n{done.stderr[-3000:]}"
    return where / "node_modules" / ".bin"


@pytest.fixture(scope="module")
def server(scripted_agent_model):
    # the CLIs' system prompts and tool lists are thousands of tokens at this tiny vocabulary
    served = start_server(scripted_agent_model, "--max-context", "32768")
    yield served
    stop_server(served)


def lines_of(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_claude_code_completes_a_tool_round_trip(server, clis, tmp_path):
    env = {**os.environ, "HOME": str(tmp_path), "ANTHROPIC_BASE_URL": server.url,
           "ANTHROPIC_AUTH_TOKEN": API_KEY, "ANTHROPIC_MODEL": "scripted",
           "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}
    run = subprocess.run(
        [str(clis / "claude"), "-p", TASK, "--output-format", "stream-json", "--verbose",
         "--max-turns", "3", "--system-prompt", "You are a test agent.", "--tools", "Bash",
         "--allowedTools", "Bash"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    events = lines_of(run.stdout)
    blocks = [(e["type"], b) for e in events if e["type"] in ("assistant", "user")
              for b in e["message"]["content"]]
    uses = [b for kind, b in blocks if kind == "assistant" and b["type"] == "tool_use"]
    results = [b for kind, b in blocks if kind == "user" and b.get("type") == "tool_result"]
    texts = [b["text"] for kind, b in blocks if kind == "assistant" and b["type"] == "text"]
    assert [u["name"] for u in uses] == ["Bash"], run.stdout[-3000:] + run.stderr[-2000:]
    assert [r["tool_use_id"] for r in results] == [uses[0]["id"]]
    assert not results[0].get("is_error"), results
    assert texts[-1] == "Done."  # the answer to the tool result
    assert (tmp_path / "cc-marker.txt").read_text() == "pipeline-ok\n"
    assert events[-1]["type"] == "result" and events[-1]["subtype"] == "success"
    assert run.returncode == 0


def test_codex_completes_a_tool_round_trip(server, clis, tmp_path):
    home = tmp_path / "codex-home"
    home.mkdir()
    # A short system prompt and fewer tools: Codex's own are ~35k tokens at this vocabulary,
    # 40 s of prefill per turn on these CPUs.
    (home / "instructions.md").write_text("You are a test agent. Run commands with "
                                          "exec_command.\n")
    (home / "config.toml").write_text(
        f'model = "scripted"\nmodel_provider = "pipeline"\nweb_search = "disabled"\n'
        f'model_instructions_file = "{home / "instructions.md"}"\n\n'
        '[features]\nmulti_agent = false\ngoals = false\nview_image = false\n'
        'image_generation = false\nskill_search = false\n\n[model_providers.pipeline]\n'
        f'name = "pipeline"\nbase_url = "{server.url}/v1"\nwire_api = "responses"\n'
        'env_key = "PIPELINE_API_KEY"\n')
    env = {**os.environ, "HOME": str(tmp_path), "CODEX_HOME": str(home),
           "PIPELINE_API_KEY": API_KEY}
    run = subprocess.run(
        [str(clis / "codex"), "exec", "--skip-git-repo-check", "--json",
         "--dangerously-bypass-approvals-and-sandbox", TASK],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
        stdin=subprocess.DEVNULL)
    items = [e["item"] for e in lines_of(run.stdout) if e["type"] == "item.completed"]
    commands = [i for i in items if i["type"] == "command_execution"]
    messages = [i["text"] for i in items if i["type"] == "agent_message"]
    assert len(commands) == 1, run.stdout[-3000:] + run.stderr[-2000:]
    assert "cx-marker.txt" in commands[0]["command"] and commands[0]["exit_code"] == 0
    assert messages[-1] == "Done."  # the answer to the command's output
    assert (tmp_path / "cx-marker.txt").read_text() == "pipeline-ok\n"
    assert run.returncode == 0
