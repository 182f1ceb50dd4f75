// The chat page of `python -m pipeline serve`: streams /v1/chat/completions, shows /stats.
"use strict";

const $ = (id) => document.getElementById(id);
let history = [];  // the conversation sent with each request: {role, content}
let controller = null;  // aborts the answer being streamed (the server then drops it)

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

const mib = (bytes) => (bytes / 2 ** 20).toFixed(1) + " MiB";

async function refreshStats() {
  let s;
  try {
    const r = await fetch("/stats");
    if (!r.ok) return;
    s = await r.json();
  } catch (e) {
    $("cluster").textContent = "server unreachable";
    return;
  }
  $("model").textContent = s.model;
  document.title = s.model + " · pipeline";
  const hosts = new Set(s.ranks.map((r) => r.host));
  const layers = s.ranks.map((r) => r.layer_range[1] - r.layer_range[0]).join(" + ");
  $("cluster").textContent = `${s.ranks.length} rank${s.ranks.length > 1 ? "s" : ""} on ` +
    `${hosts.size} host${hosts.size > 1 ? "s" : ""} · layers per rank ${layers} · ` +
    `context ${s.context} tokens · ${s.requests.active} request(s) in progress`;
  const body = $("ranks").querySelector("tbody");
  body.replaceChildren(...s.ranks.map((r) => {
    const tr = document.createElement("tr");
    const cells = [r.rank, r.host, `${r.layer_range[0]}–${r.layer_range[1] - 1}`,
      mib(r.weight_bytes), mib(r.peak_rss_bytes), r.compute_s.toFixed(2) + " s"];
    for (const c of cells) {
      const td = document.createElement("td");
      td.textContent = c;
      tr.appendChild(td);
    }
    return tr;
  }));
}

// Server-sent events of a fetch response: yields each `data:` payload.
async function* sseData(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let end;
    while ((end = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, end);
      buf = buf.slice(end + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data: ")) yield line.slice(6);
      }
    }
  }
}

async function send(text) {
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const div = addMessage("assistant", "");
  div.classList.add("streaming");
  div.dataset.chunks = "0";
  setBusy(true);
  controller = new AbortController();
  let answer = "", first = null, usage = null;
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      signal: controller.signal,
      body: JSON.stringify({
        messages: history, stream: true, stream_options: { include_usage: true },
        max_tokens: Number($("max-tokens").value), temperature: Number($("temperature").value),
      }),
    });
    if (!r.ok) {
      const err = await r.json().catch(() => ({}));
      throw new Error((err.error && err.error.message) || `${r.status} ${r.statusText}`);
    }
    for await (const data of sseData(r)) {
      if (data === "[DONE]") break;
      const event = JSON.parse(data);
      if (event.usage) usage = event.usage;
      const piece = event.choices && event.choices[0] && event.choices[0].delta.content;
      if (piece) {
        if (first === null) first = performance.now();
        answer += piece;
        div.textContent = answer;
        div.dataset.chunks = String(Number(div.dataset.chunks) + 1);
        div.scrollIntoView({ block: "end" });
      }
    }
    const seconds = first === null ? 0 : (performance.now() - first) / 1000;
    if (usage && usage.completion_tokens > 1 && seconds > 0) {
      $("speed").textContent = `${((usage.completion_tokens - 1) / seconds).toFixed(1)} tok/s ` +
        `(${usage.completion_tokens} tokens)`;
    } else if (usage) {
      $("speed").textContent = `${usage.completion_tokens} token(s)`;
    }
    history.push({ role: "assistant", content: answer });
  } catch (e) {
    if (e.name === "AbortError") {
      history.push({ role: "assistant", content: answer });
      div.dataset.stopped = "1";
    } else {
      history.pop();
      addMessage("error", e.message);
    }
  } finally {
    div.classList.remove("streaming");
    div.dataset.done = "1";
    controller = null;
    setBusy(false);
    refreshStats();
  }
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("prompt").value;
  if (!text.trim() || controller) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("reset").addEventListener("click", () => {
  if (controller) controller.abort();
  history = [];
  $("messages").replaceChildren();
});

refreshStats();
